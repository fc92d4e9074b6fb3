"""`/metrics` after real requests: counters and histogram counts move exactly as the requests imply.

In process (the real app and engine, tiny models) for exact per-request accounting; then a real
`memdec serve` process for what a scraper sees: promtool's lint of the live exposition, content
negotiation, no API key on /metrics, and the Grafana dashboard's queries against the live series.
Expected values come from the requests themselves (usage in the responses, max_tokens, n), never from
the metrics code.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from server.config import EngineConfig, MemorySpec, ModelConfig, ServerConfig
from tests.api_harness import InProcessServer, assert_error, load_hf, sse_events

PROMPT = "The patient was given a dose of"
OTHER = "Once upon a time"
DOC = "The court held that the statute applies to the contract signed last year."
BODY_LIMIT = 16 * 1024
DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "dashboards" / "memdec.json"
LATENCY = ("time_to_first_token", "e2e_request_latency", "request_queue_time", "request_prefill_time",
           "request_decode_time")
PHASES = ("schedule", "base_forward", "memory_forward", "mix_sample")

Samples = dict[tuple[str, frozenset], float]


def parse(text: str) -> Samples:
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def get(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return get(after, name, **labels) - get(before, name, **labels)


def requests_delta(before: Samples, after: Samples) -> Counter:
    """memdec_requests_total increments as {(endpoint, status, finish_reason): n}."""
    out: Counter = Counter()
    for (name, labels), value in after.items():
        if name == "memdec_requests_total":
            d = dict(labels)
            moved = value - before.get((name, labels), 0.0)
            if moved:
                out[(d["endpoint"], d["status"], d["finish_reason"])] = moved
    return out


def wait_idle(server: InProcessServer) -> None:
    """Until the engine is idle and the queue gauges (set by the engine loop) say so."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        s = scrape(server)
        if get(s, "memdec_requests_running") == 0 and get(s, "memdec_requests_waiting") == 0:
            engine = server.serving.engine
            if engine is None or engine.num_running + engine.num_waiting == 0:
                return
        time.sleep(0.05)
    raise AssertionError("the engine did not go idle")


def scrape_until(server: InProcessServer, moved: Callable[[Samples], bool]) -> Samples:
    """Scrape until `moved` holds: a request is counted when its answer's last byte is handed over, which
    for a client that hung up may be just after the client stopped waiting."""
    deadline = time.monotonic() + 30
    while not moved(samples := scrape(server)):
        assert time.monotonic() < deadline, "the metrics did not move"
        time.sleep(0.02)
    return samples


def scrape(server: InProcessServer) -> Samples:
    r = server.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(r.text)


def hf_parameters(path: Path) -> int:
    return sum(p.numel() for p in load_hf(path).parameters())


@pytest.fixture(scope="module")
def server(zoo):
    config = ServerConfig(
        model=ModelConfig(str(zoo.base)),
        engine=EngineConfig(max_num_seqs=8),
        memories=(MemorySpec("med", str(zoo.mem_llama)), MemorySpec("law", str(zoo.mem_qwen_padded))),
        enable_admin=True,
        memory_root=zoo.base.parent,
        max_body_bytes=BODY_LIMIT,
    )
    with InProcessServer(config) as s:
        wait_idle(s)
        yield s


# -- in process: exact accounting ------------------------------------------------------------------


def test_start_up_memories_and_idle_gauges(server, zoo):
    s = scrape(server)
    assert get(s, "memdec_memory_loads_total", result="success") == 2
    assert get(s, "memdec_memory_loads_total", result="invalid") == 0
    assert get(s, "memdec_memories_loaded") == 2
    assert get(s, "memdec_memory_parameters", memory="med") == hf_parameters(zoo.mem_llama)
    assert get(s, "memdec_memory_parameters", memory="law") == hf_parameters(zoo.mem_qwen_padded)
    assert get(s, "memdec_requests_running") == 0 and get(s, "memdec_requests_waiting") == 0
    # Every registered memory has its latency series from the start (dashboards show 0, not "no data").
    for memory in ("none", "med", "law"):
        assert ("memdec_e2e_request_latency_seconds_count", frozenset({("memory", memory)})) in s


def test_generation_requests_move_latency_and_token_metrics_exactly(server):
    before = scrape(server)
    t0 = time.monotonic()
    a = server.complete(prompt=PROMPT, max_tokens=5, temperature=0, ignore_eos=True)  # the base alone
    r = server.post("/v1/completions", {"prompt": OTHER, "memory": "med", "alpha": 0.5, "n": 2,
                                        "max_tokens": 4, "ignore_eos": True, "stream": True,
                                        "stream_options": {"include_usage": True}})
    assert r.status_code == 200
    b_usage = sse_events(r.text)[-2]["usage"]
    # alpha 0 = the base
    c = server.complete(prompt=PROMPT, memory="law", alpha=0.0, max_tokens=3, ignore_eos=True)
    d = server.complete(prompt=DOC, memory="med", max_tokens=0, echo=True, logprobs=0)  # prompt scoring only
    wall = time.monotonic() - t0
    wait_idle(server)
    after = scrape(server)

    assert b_usage["completion_tokens"] == 8
    p_a, p_b, p_c, p_d = (x["usage"]["prompt_tokens"] for x in (a, {"usage": b_usage}, c, d))
    # Token counters: each of the n samples prefills its own copy of the prompt.
    assert delta(before, after, "memdec_generation_tokens_total", memory="none") == 5 + 3
    assert delta(before, after, "memdec_generation_tokens_total", memory="med") == 8
    assert delta(before, after, "memdec_generation_tokens_total", memory="law") == 0
    assert delta(before, after, "memdec_prompt_tokens_total", memory="none") == p_a + p_c
    assert delta(before, after, "memdec_prompt_tokens_total", memory="med") == 2 * p_b + p_d
    # Requests with a first token: a (none), b's two samples (med), c (none); d generated nothing.
    expected_counts = {
        "none": {"time_to_first_token": 2, "e2e_request_latency": 2, "request_queue_time": 2,
                 "request_prefill_time": 2, "request_decode_time": 2, "inter_token_latency": 4 + 2},
        "med": {"time_to_first_token": 2, "e2e_request_latency": 3, "request_queue_time": 3,
                "request_prefill_time": 2, "request_decode_time": 2, "inter_token_latency": 2 * 3},
        "law": dict.fromkeys((*LATENCY, "inter_token_latency"), 0),
    }  # fmt: skip  # a table: one row per memory
    for memory, counts in expected_counts.items():
        for metric, n in counts.items():
            got = delta(before, after, f"memdec_{metric}_seconds_count", memory=memory)
            assert got == n, (memory, metric, got, n)
    for memory in ("none", "med"):
        ttft = delta(before, after, "memdec_time_to_first_token_seconds_sum", memory=memory)
        e2e = delta(before, after, "memdec_e2e_request_latency_seconds_sum", memory=memory)
        assert 0 < ttft <= e2e <= wall * 3  # med: 3 requests, each within the wall time
        # the +Inf bucket holds every observation
        assert delta(before, after, "memdec_e2e_request_latency_seconds_bucket", memory=memory,
                     le="+Inf") == expected_counts[memory]["e2e_request_latency"]
    # Sequential requests: 5 + (1 + 3) + 3 + 1 engine steps, each timing all four phases; one or two more if
    # b's two samples (submitted concurrently) reached the engine thread one or two steps apart: the second
    # one's prompt then runs beside the first one's decode and its last token comes one or two steps later.
    steps = {delta(before, after, "memdec_step_phase_seconds_count", phase=phase) for phase in PHASES}
    assert len(steps) == 1 and steps.pop() in (13, 14, 15)
    assert delta(before, after, "memdec_step_phase_seconds_sum", phase="base_forward") > 0
    assert delta(before, after, "memdec_step_phase_seconds_sum", phase="memory_forward") > 0
    assert get(after, "memdec_batch_size") == 1  # the last step ran d alone
    assert requests_delta(before, after) == Counter({("completions", "200", "length"): 4})


def test_finish_reasons_statuses_and_endpoints(server):
    first = server.complete(prompt=PROMPT, max_tokens=1, temperature=0, logprobs=0,
                            return_tokens_as_token_ids=True)
    stop_id = int(first["choices"][0]["logprobs"]["tokens"][0].split(":")[1])
    before = scrape(server)
    stopped = server.complete(prompt=PROMPT, max_tokens=5, temperature=0, stop_token_ids=[stop_id])
    assert stopped["choices"][0]["finish_reason"] == "stop"
    # Two prompts: a request is named by its least complete choice (length over stop).
    mixed = server.complete(prompt=[PROMPT, OTHER], max_tokens=3, temperature=0, stop_token_ids=[stop_id])
    reasons = {c["finish_reason"] for c in mixed["choices"]}
    mixed_reason = "length" if "length" in reasons else "stop"
    assert_error(server.post("/v1/completions", {"prompt": PROMPT, "memory": "med", "alpha": 3}), 400,
                 "alpha")
    assert_error(server.post("/v1/completions", {"prompt": PROMPT, "memory": "nope"}), 404, "memory")
    assert_error(server.post("/v1/completions", {"prompt": "x" * (BODY_LIMIT + 1)}), 413)
    assert_error(server.get("/v1/completions"), 405)
    assert_error(server.get("/v1/nothing"), 404)
    assert_error(server.post("/v1/perplexity", {"input": DOC, "stride": 0}), 400, "stride")
    assert server.get("/v1/models").status_code == 200
    assert server.get("/v1/models/med").status_code == 200
    assert server.get("/v1/memories").status_code == 200
    # Probes, scrapes and documents are not API requests: not counted.
    for path in ("/health", "/ready", "/openapi.json", "/metrics"):
        assert server.get(path).status_code == 200
    wait_idle(server)
    after = scrape(server)
    expected = Counter({
        ("completions", "200", "stop"): 1,
        ("completions", "200", mixed_reason): 1,
        ("completions", "400", "none"): 1,
        ("completions", "404", "none"): 1,
        ("completions", "413", "none"): 1,
        ("completions", "405", "none"): 1,
        ("other", "404", "none"): 1,
        ("perplexity", "400", "none"): 1,
        ("models", "200", "none"): 2,
        ("memories", "200", "none"): 1,
    })
    assert requests_delta(before, after) == expected
    # Refused requests never reached the engine: only the two completions generated.
    gen = delta(before, after, "memdec_generation_tokens_total", memory="none")
    assert gen == stopped["usage"]["completion_tokens"] + mixed["usage"]["completion_tokens"]


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnects_count_as_abort(server, stream):
    engine = server.serving.engine
    body = {"prompt": PROMPT, "memory": "med", "max_tokens": 400, "ignore_eos": True, "stream": stream}
    before = scrape(server)

    async def scenario():
        if stream:
            async with server.client.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                await anext(r.aiter_lines())  # a chunk arrived: generation is under way; then hang up
            return
        task = asyncio.ensure_future(server.client.post("/v1/completions", json=body))
        deadline = time.monotonic() + 30
        while engine.num_running == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        task.cancel()  # the transport tells the app `http.disconnect`
        await asyncio.gather(task, return_exceptions=True)

    server.call(scenario)
    wait_idle(server)
    after = scrape_until(server, lambda s: bool(requests_delta(before, s)))
    status = "200" if stream else "499"  # a stream already sent its 200; otherwise nginx's "client closed"
    assert requests_delta(before, after) == Counter({("completions", status, "abort"): 1})
    assert delta(before, after, "memdec_e2e_request_latency_seconds_count", memory="med") == 1
    assert 0 < delta(before, after, "memdec_generation_tokens_total", memory="med") < 400


def test_perplexity_requests(server):
    before = scrape(server)
    t0 = time.monotonic()
    mixed = server.post("/v1/perplexity", {"input": [DOC, PROMPT], "memory": "med", "alpha": [0.5, 0.0]})
    base = server.post("/v1/perplexity", {"input": DOC})
    wall = time.monotonic() - t0
    assert mixed.status_code == 200 and base.status_code == 200
    after = scrape(server)
    assert delta(before, after, "memdec_perplexity_request_seconds_count", memory="med") == 1
    assert delta(before, after, "memdec_perplexity_request_seconds_count", memory="none") == 1
    assert 0 < delta(before, after, "memdec_perplexity_request_seconds_sum", memory="med") < wall
    assert (delta(before, after, "memdec_prompt_tokens_total", memory="med")
            == mixed.json()["usage"]["prompt_tokens"])
    assert (delta(before, after, "memdec_prompt_tokens_total", memory="none")
            == base.json()["usage"]["prompt_tokens"])
    assert delta(before, after, "memdec_generation_tokens_total", memory="med") == 0
    assert requests_delta(before, after) == Counter({("perplexity", "200", "none"): 2})


def test_hot_loads_unloads_and_their_results(server, zoo):
    before = scrape(server)
    assert server.post("/v1/memories", {"name": "fin", "path": "mem_gpt2"}).status_code == 200
    assert_error(server.post("/v1/memories", {"name": "fin2", "path": "does-not-exist"}), 400, "path")
    assert_error(server.post("/v1/memories", {"name": "alien", "path": "mem_foreign"}), 400, "path")
    assert_error(server.post("/v1/memories", {"name": "fin", "path": "mem_gpt2"}), 409, "name")
    assert_error(server.post("/v1/memories", {"name": "esc", "path": "/etc"}), 403, "path")
    assert_error(server.post("/v1/memories", {"name": "x", "path": 5}), 400)  # a malformed body: no attempt
    mid = scrape(server)
    assert delta(before, mid, "memdec_memory_loads_total", result="success") == 1
    assert delta(before, mid, "memdec_memory_loads_total", result="invalid") == 4
    assert delta(before, mid, "memdec_memory_loads_total", result="error") == 0
    assert get(mid, "memdec_memories_loaded") == 3
    assert get(mid, "memdec_memory_parameters", memory="fin") == hf_parameters(zoo.mem_gpt2)

    used = server.complete(prompt=PROMPT, model="fin", max_tokens=2, ignore_eos=True)
    assert server.delete("/v1/memories/fin").status_code == 200
    wait_idle(server)
    after = scrape(server)
    assert get(after, "memdec_memories_loaded") == 2
    assert ("memdec_memory_parameters", frozenset({("memory", "fin")})) not in after
    # A memory's latency series outlive it (requests in flight may still finish with its label).
    assert (delta(before, after, "memdec_generation_tokens_total", memory="fin")
            == used["usage"]["completion_tokens"])
    assert delta(before, after, "memdec_e2e_request_latency_seconds_count", memory="fin") == 1
    assert requests_delta(before, after) == Counter({
        ("memories", "200", "none"): 2, ("memories", "400", "none"): 3, ("memories", "409", "none"): 1,
        ("memories", "403", "none"): 1, ("completions", "200", "length"): 1,
    })


def test_queue_full_and_engine_stop_are_counted(zoo):
    config = ServerConfig(model=ModelConfig(str(zoo.base)), engine=EngineConfig(max_num_seqs=1), max_queue=1)
    with InProcessServer(config) as s:
        wait_idle(s)
        before = scrape(s)
        body = {"prompt": PROMPT, "max_tokens": 40, "ignore_eos": True}

        async def burst():
            return await asyncio.gather(*(s.client.post("/v1/completions", json=body) for _ in range(6)))

        codes = Counter(r.status_code for r in s.call(burst))
        assert set(codes) == {200, 429}, codes
        wait_idle(s)
        mid = scrape(s)
        assert requests_delta(before, mid) == Counter(
            {("completions", "200", "length"): codes[200], ("completions", "429", "none"): codes[429]}
        )
        assert delta(before, mid, "memdec_generation_tokens_total", memory="none") == 40 * codes[200]

        async def stop_under_requests():
            engine = s.serving.engine
            async with s.client.stream("POST", "/v1/completions",
                                       json={**body, "max_tokens": 400, "stream": True}) as r:
                lines = r.aiter_lines()
                await anext(lines)
                plain = asyncio.ensure_future(s.client.post("/v1/completions",
                                                            json={**body, "max_tokens": 400}))
                while engine.num_waiting == 0:
                    await asyncio.sleep(0.01)
                await asyncio.to_thread(engine.shutdown)
                rest = [line async for line in lines]
            return rest, await plain

        rest, plain = s.call(stop_under_requests)
        events = [line for line in rest if line]
        assert (events[-1] == "data: [DONE]"
                and set(json.loads(events[-2].removeprefix("data: "))) == {"error"})
        assert_error(plain, 503)
        after = scrape(s)
        assert requests_delta(mid, after) == Counter(
            {("completions", "200", "error"): 1, ("completions", "503", "none"): 1}
        )


def test_failed_start_up_load_is_counted_and_metrics_still_served(zoo):
    config = ServerConfig(model=ModelConfig(str(zoo.base)),
                          memories=(MemorySpec("alien", str(zoo.mem_foreign)),))
    with InProcessServer(config, wait=False) as s:
        deadline = time.monotonic() + 60
        while s.state.phase.value != "failed" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert_error(s.get("/health"), 503, code="startup_failed")
        m = scrape(s)
        assert get(m, "memdec_memory_loads_total", result="invalid") == 1
        assert get(m, "memdec_memory_loads_total", result="success") == 0
        assert get(m, "memdec_memories_loaded") == 0


# -- a real process: what Prometheus scrapes -----------------------------------------------------------

API_KEY = "metrics-user-key"


@pytest.fixture(scope="module")
def live(zoo, live_server):
    args = ["--model", str(zoo.base), "--served-model-name", "tiny", "--memory", f"med={zoo.mem_llama}",
            "--api-key", API_KEY]  # fmt: skip  # flag/value pairs on one line
    with live_server("metrics", args) as s:
        auth = {"Authorization": f"Bearer {API_KEY}"}
        with httpx.Client(base_url=s.url, headers=auth, timeout=60) as c:
            # traffic on every path that fills a series: memory, base, stream, perplexity, a refusal
            for body in ({"prompt": PROMPT, "memory": "med", "max_tokens": 4, "ignore_eos": True},
                         {"prompt": PROMPT, "max_tokens": 3, "ignore_eos": True, "stream": True},
                         {"prompt": PROMPT, "memory": "med", "alpha": 2}):
                c.post("/v1/completions", json=body)
            assert c.post("/v1/perplexity", json={"input": DOC, "memory": "med"}).status_code == 200
        yield s


def test_live_metrics_need_no_api_key_and_negotiate_the_format(live):
    assert httpx.get(live.url + "/v1/models").status_code == 401  # the API is keyed ...
    r = httpx.get(live.url + "/metrics")  # ... the scrape endpoint is not
    assert r.status_code == 200 and r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    s = parse(r.text)
    assert get(s, "memdec_requests_total", endpoint="models", status="401", finish_reason="none") >= 1
    assert get(s, "memdec_requests_total", endpoint="completions", status="200", finish_reason="length") == 2
    assert get(s, "memdec_requests_total", endpoint="completions", status="400", finish_reason="none") == 1
    assert get(s, "memdec_generation_tokens_total", memory="med") == 4
    assert get(s, "memdec_generation_tokens_total", memory="none") == 3
    assert get(s, "memdec_perplexity_request_seconds_count", memory="med") == 1
    om = httpx.get(live.url + "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert om.headers["content-type"].startswith("application/openmetrics-text")
    families = {f.name: f for f in parse_openmetrics(om.text)}
    assert families["memdec_generation_tokens"].type == "counter"
    assert om.text.rstrip().endswith("# EOF")


def test_promtool_accepts_the_live_exposition(live):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not found: `apt-get install prometheus` (.ci/run does) "
                    "to lint the live /metrics")
    body = httpx.get(live.url + "/metrics").content
    assert b'memory="med"' in body
    res = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, timeout=60)
    assert res.returncode == 0, res.stdout.decode() + res.stderr.decode()


def _dashboard_queries() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    return queries + [v["definition"] for v in dash["templating"]["list"] if v["type"] == "query"]


def test_dashboard_queries_match_the_live_series(live):
    """Every metric a dashboard query names is in the live output, with every label the query matches or
    groups on (`instance` is Prometheus's own; `le` is on the _bucket series)."""
    s = parse(httpx.get(live.url + "/metrics").text)
    labels_of: dict[str, set[str]] = {}
    for name, labels in s:
        labels_of.setdefault(name, set()).update(k for k, _ in labels)
    for query in _dashboard_queries():
        names = set(re.findall(r"\bmemdec_\w+", query))
        assert names, query
        for name in names:
            assert name in labels_of, f"{name} (in {query!r}) is not in the live /metrics"
        used = set(re.findall(r"(\w+)\s*=~?", query))
        for group in re.findall(r"by \(([^)]*)\)", query):
            used |= {g.strip() for g in group.split(",")}
        used |= set(re.findall(r"label_values\(\w+,\s*(\w+)\)", query))
        used -= {"instance"}
        for label in used:
            assert any(label in labels_of[n] for n in names), (
                f"no series in {query!r} carries label {label!r}"
            )
