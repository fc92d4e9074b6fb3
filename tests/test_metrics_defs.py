"""server/metrics.py on its own: names, labels, values after calls, bounded labels, and promtool's lint."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from server.metrics import (
    REQUEST_BUCKETS,
    STEP_BUCKETS,
    Metrics,
    exposed_series_names,
)
from server.request import FinishReason

# Issue 5, written out independently of the module: family name -> (type, label names).
SPEC = {
    "memdec_time_to_first_token_seconds": ("histogram", {"memory"}),
    "memdec_inter_token_latency_seconds": ("histogram", {"memory"}),
    "memdec_e2e_request_latency_seconds": ("histogram", {"memory"}),
    "memdec_request_queue_time_seconds": ("histogram", {"memory"}),
    "memdec_request_prefill_time_seconds": ("histogram", {"memory"}),
    "memdec_request_decode_time_seconds": ("histogram", {"memory"}),
    "memdec_step_phase_seconds": ("histogram", {"phase"}),
    "memdec_perplexity_request_seconds": ("histogram", {"memory"}),
    "memdec_prompt_tokens": ("counter", {"memory"}),
    "memdec_generation_tokens": ("counter", {"memory"}),
    "memdec_requests": ("counter", {"endpoint", "status", "finish_reason"}),
    "memdec_memory_loads": ("counter", {"result"}),
    "memdec_requests_running": ("gauge", set()),
    "memdec_requests_waiting": ("gauge", set()),
    "memdec_memories_loaded": ("gauge", set()),
    "memdec_memory_parameters": ("gauge", {"memory"}),
    "memdec_batch_size": ("gauge", set()),
    # Issue 12: the paged KV cache and CUDA graphs.
    "memdec_kv_cache_usage_perc": ("gauge", set()),
    "memdec_num_preemptions": ("counter", set()),
    "memdec_cuda_graph_capture_seconds": ("gauge", {"memory"}),
    # Issue 13: speculative mixing.
    "memdec_spec_draft_tokens": ("counter", {"memory"}),
    "memdec_spec_accepted_tokens": ("counter", {"memory"}),
    # Issue 21: prefix caching (vLLM's queries / hits, in tokens), per cache.
    "memdec_prefix_cache_queries": ("counter", {"cache"}),
    "memdec_prefix_cache_hits": ("counter", {"cache"}),
    "memdec_auto_memory_choices": ("counter", {"memory"}),
    # Issue 20: tensor parallelism (rank 0 serves the whole server's metrics).
    "memdec_tensor_parallel_size": ("gauge", set()),
}


def samples(m: Metrics) -> dict[tuple[str, frozenset], float]:
    """Parse the rendered text back (prometheus_client's own parser) into {(name, labels): value}."""
    body, _ = m.render()
    out = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def val(m: Metrics, name: str, **labels: str) -> float | None:
    return samples(m).get((name, frozenset(labels.items())))


def exercise(m: Metrics) -> None:
    """Touch every metric and every label path once."""
    m.memory_loaded("med", 1_234_567)
    m.memory_loaded("law", 7_654)
    m.memory_load_result("success")
    m.memory_load_result("invalid")
    m.set_queue(running=3, waiting=5)
    m.observe_step({"schedule": 0.00004, "base_forward": 0.02, "memory_forward": 0.003, "mix_sample": 0.0007},
                   3)
    m.observe_request_finished(
        "med", queue_s=0.0002, e2e_s=1.3, ttft_s=0.1, prefill_s=0.0998, decode_s=1.2,
        itl=[0.3, 0.3, 0.6], prompt_tokens=11, generation_tokens=4,
    )
    m.observe_request_finished(None, queue_s=0.01, e2e_s=0.02, ttft_s=0.02, prefill_s=0.01, decode_s=0.0,
                               prompt_tokens=2, generation_tokens=1)
    m.observe_perplexity("law", 2.0, tokens=100)
    m.request_done("completions", 200, FinishReason.STOP)
    m.request_done("perplexity", 200)
    m.request_done("completions", 400)
    m.set_kv_cache(0.25, preemptions=2)
    m.graph_captured(None, 1.5)
    m.graph_captured("med", 0.5)
    m.observe_speculation("med", 8, 6)
    m.observe_prefix_cache("base", 420, 400)
    m.observe_prefix_cache("memory", 420, 370)
    m.auto_memory_chosen("med")
    m.auto_memory_chosen(None)


def test_exactly_the_metrics_of_issue_5_with_their_labels():
    m = Metrics()
    exercise(m)
    body, content_type = m.render()
    assert content_type.startswith("text/plain; version=0.0.4")
    fams = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert {n: f.type for n, f in fams.items()} == {n: t for n, (t, _) in SPEC.items()}
    for name, (_, labels) in SPEC.items():
        seen = {k for s in fams[name].samples for k in s.labels if k != "le"}
        assert seen == labels, name
    # Every emitted sample name is one the dashboard checker knows, and the reverse.
    emitted = {s.name for f in fams.values() for s in f.samples}
    assert emitted == exposed_series_names()


def test_request_finished_moves_histograms_and_token_counters():
    m = Metrics()
    m.memory_loaded("med", 10)
    before = samples(m)
    assert before[("memdec_time_to_first_token_seconds_count", frozenset({("memory", "med")}))] == 0
    m.observe_request_finished(
        "med", queue_s=0.0002, e2e_s=1.3, ttft_s=0.1, prefill_s=0.0998, decode_s=1.2,
        itl=[0.3, 0.3, 0.6], prompt_tokens=11, generation_tokens=4,
    )
    med = {"memory": "med"}
    assert val(m, "memdec_time_to_first_token_seconds_count", **med) == 1
    assert val(m, "memdec_time_to_first_token_seconds_sum", **med) == pytest.approx(0.1)
    # 0.1 s falls in le=0.1 (inclusive upper bound) and not in le=0.05.
    assert val(m, "memdec_time_to_first_token_seconds_bucket", le="0.1", **med) == 1
    assert val(m, "memdec_time_to_first_token_seconds_bucket", le="0.05", **med) == 0
    assert val(m, "memdec_inter_token_latency_seconds_count", **med) == 3
    assert val(m, "memdec_inter_token_latency_seconds_sum", **med) == pytest.approx(1.2)
    assert val(m, "memdec_inter_token_latency_seconds_bucket", le="0.5", **med) == 2
    assert val(m, "memdec_inter_token_latency_seconds_bucket", le="+Inf", **med) == 3
    assert val(m, "memdec_request_queue_time_seconds_bucket", le="0.0005", **med) == 1
    assert val(m, "memdec_request_prefill_time_seconds_sum", **med) == pytest.approx(0.0998)
    assert val(m, "memdec_request_decode_time_seconds_sum", **med) == pytest.approx(1.2)
    assert val(m, "memdec_e2e_request_latency_seconds_bucket", le="2.5", **med) == 1
    assert val(m, "memdec_e2e_request_latency_seconds_bucket", le="1.0", **med) == 0
    assert val(m, "memdec_prompt_tokens_total", **med) == 11
    assert val(m, "memdec_generation_tokens_total", **med) == 4
    # The base-alone series did not move.
    assert val(m, "memdec_e2e_request_latency_seconds_count", memory="none") == 0
    assert val(m, "memdec_prompt_tokens_total", memory="none") == 0

    # An aborted request with no first token observes no TTFT/prefill/decode, only queue and e2e.
    m.observe_request_finished("med", queue_s=3.0, e2e_s=3.0, prompt_tokens=7)
    assert val(m, "memdec_time_to_first_token_seconds_count", **med) == 1
    assert val(m, "memdec_request_decode_time_seconds_count", **med) == 1
    assert val(m, "memdec_request_queue_time_seconds_count", **med) == 2
    assert val(m, "memdec_e2e_request_latency_seconds_count", **med) == 2
    assert val(m, "memdec_prompt_tokens_total", **med) == 18
    assert val(m, "memdec_generation_tokens_total", **med) == 4


def test_memory_labels_are_bounded():
    m = Metrics(max_memory_labels=2)
    m.memory_loaded("a", 1)
    m.memory_loaded("b", 1)
    m.memory_loaded("c", 1)  # past the cap: servable, but its latencies go to "other"
    assert m.memory_label(None) == "none"
    assert m.memory_label("a") == "a"
    assert m.memory_label("c") == "other"
    assert m.memory_label("never-registered") == "other"
    for name in ("a", "c", "never-registered", None):
        m.observe_request_finished(name, queue_s=0.0, e2e_s=0.1, generation_tokens=1)
    assert val(m, "memdec_generation_tokens_total", memory="a") == 1
    assert val(m, "memdec_generation_tokens_total", memory="other") == 2
    assert val(m, "memdec_generation_tokens_total", memory="none") == 1
    assert val(m, "memdec_generation_tokens_total", memory="never-registered") is None
    memory_values = {dict(k)["memory"] for (_, k) in samples(m) if "memory" in dict(k)}
    assert memory_values == {"none", "other", "a", "b", "c"}  # "c" only in memory_parameters
    assert val(m, "memdec_memory_parameters", memory="c") == 1


def test_reserved_memory_names_do_not_pollute_the_base_series():
    m = Metrics()
    m.memory_loaded("none", 5)  # a registry that let this name through: served, counted as "other"
    assert m.memory_label("none") == "other"
    m.observe_request_finished("none", queue_s=0.0, e2e_s=0.1, generation_tokens=3)
    m.observe_request_finished(None, queue_s=0.0, e2e_s=0.1, generation_tokens=1)
    assert val(m, "memdec_generation_tokens_total", memory="none") == 1
    assert val(m, "memdec_generation_tokens_total", memory="other") == 3
    assert val(m, "memdec_memories_loaded") == 1


def test_load_and_unload_memories():
    m = Metrics()
    assert val(m, "memdec_memories_loaded") == 0
    assert val(m, "memdec_memory_loads_total", result="success") == 0  # exists from the start
    m.memory_loaded("med", 1000)
    m.memory_load_result("success")
    m.memory_loaded("law", 2000)
    m.memory_load_result("success")
    m.memory_load_result("invalid")
    m.memory_load_result("error")
    assert val(m, "memdec_memories_loaded") == 2
    assert val(m, "memdec_memory_parameters", memory="law") == 2000
    assert val(m, "memdec_memory_loads_total", result="success") == 2
    assert val(m, "memdec_memory_loads_total", result="invalid") == 1
    assert val(m, "memdec_memory_loads_total", result="error") == 1
    with pytest.raises(ValueError):
        m.memory_load_result("maybe")

    m.observe_request_finished("law", queue_s=0.0, e2e_s=0.1)
    m.memory_unloaded("law")
    m.memory_unloaded("law")  # twice is harmless
    assert val(m, "memdec_memories_loaded") == 1
    assert val(m, "memdec_memory_parameters", memory="law") is None
    assert val(m, "memdec_memory_parameters", memory="med") == 1000
    # History stays, and a request still in flight when its memory went keeps its label.
    m.observe_request_finished("law", queue_s=0.0, e2e_s=0.1)
    assert val(m, "memdec_e2e_request_latency_seconds_count", memory="law") == 2
    m.memory_loaded("law", 3000)  # reloading does not double-count
    assert val(m, "memdec_memories_loaded") == 2
    assert val(m, "memdec_memory_parameters", memory="law") == 3000


def test_steps_queue_and_requests():
    m = Metrics()
    for phase in ("schedule", "base_forward", "memory_forward", "mix_sample"):
        assert val(m, "memdec_step_phase_seconds_count", phase=phase) == 0
    m.observe_step({"schedule": 0.00004, "base_forward": 0.02, "mix_sample": 0.0007}, batch_size=3)
    m.observe_step({"schedule": 0.00004, "base_forward": 0.03, "memory_forward": 0.004, "mix_sample": 0.0007},
                   5)
    assert val(m, "memdec_step_phase_seconds_count", phase="base_forward") == 2
    assert val(m, "memdec_step_phase_seconds_sum", phase="base_forward") == pytest.approx(0.05)
    assert val(m, "memdec_step_phase_seconds_count", phase="memory_forward") == 1
    assert val(m, "memdec_step_phase_seconds_bucket", phase="schedule", le="5e-05") == 2  # GPU scale resolved
    assert val(m, "memdec_batch_size") == 5
    with pytest.raises(ValueError, match="phase"):
        m.observe_step({"sample": 0.1}, 1)

    m.set_queue(running=4, waiting=9)
    assert (val(m, "memdec_requests_running"), val(m, "memdec_requests_waiting")) == (4, 9)
    m.set_queue(running=0, waiting=0)
    assert (val(m, "memdec_requests_running"), val(m, "memdec_requests_waiting")) == (0, 0)

    m.request_done("completions", 200, FinishReason.LENGTH)
    m.request_done("/v1/completions", 200, "length")  # a path counts as its endpoint
    m.request_done("/v1/chat/completions", 200, "stop")  # chat is its own endpoint, not "other"
    m.request_done("/v1/memories/med", 200)
    m.request_done("completions", 429)
    m.request_done("/v1/../../etc/passwd", 404)  # unknown endpoints collapse into one series
    m.request_done("whatever", 404)
    m.request_done("completions", 200, "made-up")
    assert val(m, "memdec_requests_total", endpoint="completions", status="200", finish_reason="length") == 2
    assert val(m, "memdec_requests_total", endpoint="completions", status="429", finish_reason="none") == 1
    assert val(m, "memdec_requests_total", endpoint="chat", status="200", finish_reason="stop") == 1
    assert val(m, "memdec_requests_total", endpoint="memories", status="200", finish_reason="none") == 1
    assert val(m, "memdec_requests_total", endpoint="other", status="404", finish_reason="none") == 2
    assert val(m, "memdec_requests_total", endpoint="completions", status="200", finish_reason="other") == 1
    with pytest.raises(ValueError):
        m.request_done("completions", 1000)

    m.observe_perplexity(None, 0.25, tokens=40)
    assert val(m, "memdec_perplexity_request_seconds_count", memory="none") == 1
    assert val(m, "memdec_perplexity_request_seconds_bucket", memory="none", le="0.25") == 1
    assert val(m, "memdec_prompt_tokens_total", memory="none") == 40


def test_kv_cache_preemptions_and_graph_capture():
    m = Metrics(max_memory_labels=1)
    assert val(m, "memdec_kv_cache_usage_perc") == 0 and val(m, "memdec_num_preemptions_total") == 0
    m.set_kv_cache(0.4)
    m.set_kv_cache(0.75, preemptions=3)
    assert val(m, "memdec_kv_cache_usage_perc") == 0.75 and val(m, "memdec_num_preemptions_total") == 3
    m.graph_captured(None, 2.5)  # the base
    m.graph_captured("med", 0.5)  # captured just before it is registered, still gets its own series
    m.memory_loaded("med", 10)
    m.graph_captured("law", 0.25)  # past max_memory_labels: bounded
    assert val(m, "memdec_cuda_graph_capture_seconds", memory="none") == 2.5
    assert val(m, "memdec_cuda_graph_capture_seconds", memory="med") == 0.5
    assert val(m, "memdec_cuda_graph_capture_seconds", memory="other") == 0.25
    m.memory_unloaded("med")
    assert val(m, "memdec_cuda_graph_capture_seconds", memory="med") is None


def test_speculation_counts_drafted_and_accepted_tokens_per_memory():
    m = Metrics(max_memory_labels=1)
    m.memory_loaded("med", 10)
    assert val(m, "memdec_spec_draft_tokens_total", memory="med") == 0  # exists once the memory is loaded
    assert val(m, "memdec_spec_draft_tokens_total", memory="none") is None  # the base alone never drafts
    m.observe_speculation("med", 12, 9)
    m.observe_speculation("med", 4, 0)
    m.observe_speculation("law", 3, 3)  # past max_memory_labels: bounded
    assert val(m, "memdec_spec_draft_tokens_total", memory="med") == 16
    assert val(m, "memdec_spec_accepted_tokens_total", memory="med") == 9
    assert val(m, "memdec_spec_accepted_tokens_total", memory="other") == 3


def test_prefix_cache_counts_queried_and_hit_tokens_per_cache():
    m = Metrics()
    # exists from the start: a rate of 0
    assert val(m, "memdec_prefix_cache_queries_total", cache="base") == 0
    assert val(m, "memdec_prefix_cache_hits_total", cache="memory") == 0
    m.observe_prefix_cache("base", 420, 400)
    m.observe_prefix_cache("base", 30, 0)
    m.observe_prefix_cache("memory", 420, 370)
    assert val(m, "memdec_prefix_cache_queries_total", cache="base") == 450
    assert val(m, "memdec_prefix_cache_hits_total", cache="base") == 400
    assert val(m, "memdec_prefix_cache_hits_total", cache="memory") == 370
    with pytest.raises(ValueError):
        m.observe_prefix_cache("med", 1, 1)  # bounded: base or memory, never a name


def test_two_instances_in_one_process_are_independent():
    a, b = Metrics(), Metrics()
    a.set_queue(1, 2)
    a.memory_loaded("x", 5)
    assert val(b, "memdec_requests_waiting") == 0
    assert val(b, "memdec_memory_parameters", memory="x") is None
    assert val(a, "memdec_requests_waiting") == 2


def test_buckets_span_gpu_and_cpu_scales():
    for buckets in (STEP_BUCKETS, REQUEST_BUCKETS):
        assert list(buckets) == sorted(set(buckets))
        ratios = [hi / lo for lo, hi in zip(buckets, buckets[1:], strict=False)]
        assert max(ratios) <= 2.5 + 1e-9  # a quantile read off a bucket is within a factor 2.5
    assert STEP_BUCKETS[0] <= 1e-4 and STEP_BUCKETS[-1] >= 1.0  # tens of us (GPU phases) .. CPU steps
    assert REQUEST_BUCKETS[0] <= 1e-3 and REQUEST_BUCKETS[-1] >= 300  # GPU TTFT .. long CPU generations


def test_openmetrics_negotiation():
    m = Metrics()
    exercise(m)
    body, content_type = m.render("application/openmetrics-text; version=1.0.0,text/plain;q=0.5")
    assert content_type.startswith("application/openmetrics-text")
    fams = {f.name: f for f in parse_openmetrics(body.decode())}
    assert fams["memdec_generation_tokens"].type == "counter"
    assert any(s.value == 4 and s.labels == {"memory": "med"}
               for s in fams["memdec_generation_tokens"].samples)


def test_promtool_check_metrics():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not found: `apt-get install prometheus` (.ci/run does) to lint the exposition")
    m = Metrics()
    exercise(m)
    body, _ = m.render()
    res = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, timeout=60)
    assert res.returncode == 0, res.stdout.decode() + res.stderr.decode()
    # The check can fail: a counter without the _total suffix is flagged.
    bad = b"# HELP x_things x\n# TYPE x_things counter\nx_things 1\n"
    res = subprocess.run([promtool, "check", "metrics"], input=bad, capture_output=True, timeout=60)
    assert res.returncode != 0
