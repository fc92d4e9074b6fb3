"""The standard evaluation and benchmark clients, unmodified, against a real `memdec serve`.

- lm-evaluation-harness: `local-completions` (log-likelihoods and generate_until, with the server's own
  tokenizer through /tokenizer_info and /tokenize) and `local-chat-completions`, on the local tasks of
  `testkit.lm_eval_tasks`; its log-likelihoods must equal the mixture's computed from plain HF forwards, and
  its generations the reference's greedy text.
- GuideLLM (`guidellm run`) on both endpoints with synthetic prompts made with the server's tokenizer: no
  errors, and its per-request token counts equal the server's usage and its metrics counters.

Nothing is downloaded: the hub and datasets libraries run offline, and the tasks' data are local files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from testkit.lm_eval_tasks import GEN_MAX_TOKENS, GEN_TASK, GEN_UNTIL, MC_TASK, write_tasks
from testkit.models import CHAT_TEMPLATE
from tests.api_harness import greedy_reference, next_token_logprobs

BIN = Path(sys.executable).parent
MEMORY_ALPHA = 0.6  # zoo.mem_llama's manifest alpha: the memory named as `model` runs at it


@pytest.fixture(scope="module")
def server(zoo, live_server):
    with live_server("clients", ["--model", str(zoo.chat_base), "--memory", f"med={zoo.mem_llama}"]) as s:
        yield s


def _offline_env(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf-home"), "OPENAI_API_KEY": "unused", "PYTHONPATH": "",
    }


def _run(cmd: list[str], tmp_path: Path, timeout: int = 600) -> str:
    res = subprocess.run(cmd, env=_offline_env(tmp_path), cwd=tmp_path, capture_output=True, text=True,
                         timeout=timeout)
    output = res.stdout + res.stderr
    assert res.returncode == 0, output[-6000:]
    return output


def _samples(out_dir: Path, task: str) -> list[dict]:
    [path] = out_dir.glob(f"**/samples_{task}_*.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


def _lm_eval(model: str, args: str, tasks: list[str], tmp_path: Path, *extra: str) -> Path:
    out = tmp_path / f"lm-eval-{model}"
    _run([str(BIN / "lm_eval"), "run", "--model", model, "--model_args", args, "--include_path",
          str(write_tasks(tmp_path / "tasks")), "--tasks", *tasks, "--output_path", str(out), "--log_samples",
          *extra], tmp_path)  # fmt: skip  # flag/value pairs on one line
    return out


def _greedy_text(ref, prompt: list[int], steps: int) -> str:
    """The reference's greedy continuation as text, cut where lm-eval's stop sequences (and EOS) cut it."""
    ids, _ = greedy_reference(ref.base, ref.med, prompt, MEMORY_ALPHA, ref.vocab, steps)
    if ref.tok.eos_token_id in ids:
        ids = ids[: ids.index(ref.tok.eos_token_id)]
    text = ref.tok.decode(ids, skip_special_tokens=True).rstrip("\ufffd")
    for stop in GEN_UNTIL:
        text = text.split(stop)[0]
    return text


def test_lm_eval_local_completions_scores_with_the_mixture_and_the_server_tokenizer(server, ref, tmp_path):
    args = f"model=med,base_url={server.url}/v1/completions,max_length=512"
    out = _lm_eval("local-completions", args, [MC_TASK, GEN_TASK], tmp_path)
    log = server.logs()
    assert '"GET /tokenizer_info HTTP/1.1" 200' in log and '"POST /tokenize HTTP/1.1" 200' in log

    scored = 0
    for sample in _samples(out, MC_TASK):
        for request, resp in zip(sample["arguments"].values(), sample["resps"], strict=True):
            context, continuation = request["arg_0"], request["arg_1"]
            whole = ref.tok(context + continuation, add_special_tokens=False)["input_ids"]
            start = len(ref.tok(context, add_special_tokens=False)["input_ids"])
            lp = next_token_logprobs(ref.base, ref.med, whole, MEMORY_ALPHA, ref.vocab)
            expected = sum(float(lp[t - 1, whole[t]]) for t in range(start, len(whole)))
            assert float(resp[0][0]) == pytest.approx(expected, abs=1e-3), (context, continuation)
            scored += 1
    assert scored == 12  # 6 documents x 2 choices

    for sample in _samples(out, GEN_TASK):
        prompt = ref.tok(sample["arguments"]["gen_args_0"]["arg_0"], add_special_tokens=False)["input_ids"]
        assert sample["resps"][0][0] == _greedy_text(ref, prompt, GEN_MAX_TOKENS)


def test_lm_eval_local_chat_completions_generates_through_the_chat_template(server, ref, tmp_path):
    args = f"model=med,base_url={server.url}/v1/chat/completions,max_length=512"
    out = _lm_eval("local-chat-completions", args, [GEN_TASK], tmp_path, "--apply_chat_template")
    samples = _samples(out, GEN_TASK)
    assert len(samples) == 3
    for sample in samples:
        [sent] = sample["arguments"]["gen_args_0"]["arg_0"]  # lm-eval logs the messages it sent as JSON
        messages = json.loads(sent)
        assert messages[-1]["role"] == "user" and messages[-1]["content"] == sample["doc"]["prompt"]
        text = ref.tok.apply_chat_template(messages, chat_template=CHAT_TEMPLATE, add_generation_prompt=True,
                                           tokenize=False)
        prompt = ref.tok(text, add_special_tokens=False)["input_ids"]
        assert sample["resps"][0][0] == _greedy_text(ref, prompt, GEN_MAX_TOKENS)


def _token_counters(url: str) -> tuple[float, float]:
    totals = {"memdec_prompt_tokens_total": 0.0, "memdec_generation_tokens_total": 0.0}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in family.samples:
            if s.name in totals:
                totals[s.name] += s.value
    return totals["memdec_prompt_tokens_total"], totals["memdec_generation_tokens_total"]


@pytest.mark.parametrize("endpoint", ["/v1/chat/completions", "/v1/completions"])
def test_guidellm_benchmark_runs_clean_and_counts_what_the_server_counts(server, zoo, tmp_path, endpoint):
    requests, prompt_tokens, output_tokens = 4, 16, 8
    before = _token_counters(server.url)
    report_path = tmp_path / "guidellm.json"
    _run([
        str(BIN / "guidellm"), "run",
        "--backend", f"kind=openai_http,target={server.url},model=med,request_format={endpoint}",
        "--profile", "kind=concurrent,streams=2",
        "--constraint", f"kind=max_requests,count={requests}",
        "--data", f"kind=synthetic_text,prompt_tokens={prompt_tokens},output_tokens={output_tokens}",
        "--tokenizer", f"kind=hf_auto,model={zoo.chat_base}",
        "--output", f"kind=json,path={report_path}", "--disable-console-interactive",
    ], tmp_path)  # fmt: skip  # flag/value pairs on one line
    after = _token_counters(server.url)

    [benchmark] = json.loads(report_path.read_text())["benchmarks"]
    done = benchmark["requests"]
    assert done["errored"] == [] and done["incomplete"] == [] and len(done["successful"]) == requests
    sent_in = sent_out = 0
    for r in done["successful"]:
        body = json.loads(r["request_args"])["body"]
        assert body["stream"] and body["stream_options"] == {"include_usage": True,
                                                             "continuous_usage_stats": True}
        assert body["ignore_eos"] is True and body.get("stop") is None  # (the report leaves out nulls)
        shape = {"messages": body["messages"]} if "messages" in body else {"prompt": body["prompt"]}
        tokens = httpx.post(server.url + "/tokenize", json=shape, timeout=60).json()["count"]
        # the benchmark's count is the server's tokenization
        assert r["input_metrics"]["text_tokens"] == tokens
        assert r["output_metrics"]["text_tokens"] == output_tokens  # ignore_eos: exactly what was asked
        sent_in += tokens
        sent_out += output_tokens
    # and the server's own counters
    assert (after[0] - before[0], after[1] - before[1]) == (sent_in, sent_out)
