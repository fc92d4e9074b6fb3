"""End to end: `memdec serve` as a real process on a free port, driven by the official `openai` client
(and plain httpx for memdec's own endpoints), checked against plain HF forwards."""

from __future__ import annotations

import math
import signal
import threading
from contextlib import suppress

import httpx
import openai
import pytest

from testkit.server import serve
from tests.api_harness import greedy_reference, ids_of, next_token_logprobs

API_KEY = "e2e-user-key"
ADMIN_KEY = "e2e-admin-key"
PROMPT = "The patient was given a dose of"
DOC = "The court held that the statute applies to the contract signed last year."


@pytest.fixture(scope="module")
def server(zoo, live_server):
    args = [
        "--model", str(zoo.base), "--served-model-name", "tiny",
        "--memory", f"med={zoo.mem_llama}", "--memory", f"law={zoo.mem_qwen_padded}:0.3",
        "--admin-key", ADMIN_KEY, "--memory-root", str(zoo.base.parent),
    ]  # fmt: skip  # flag/value pairs on one line
    with live_server("e2e", args, env={"MEMDEC_API_KEY": API_KEY}) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def test_models(client, zoo):
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {"tiny", "med", "law"}
    assert cards["tiny"].owned_by == "memdec" and cards["tiny"].model_extra["root"] == str(zoo.base)
    assert cards["med"].model_extra["parent"] == "tiny" and cards["med"].model_extra["alpha"] == 0.6
    assert cards["law"].model_extra["alpha"] == 0.3  # NAME=PATH:ALPHA overrides the manifest's 0.4
    assert cards["law"].model_extra["max_model_len"] == 512
    assert client.models.retrieve("med").model_extra["domain"] == "biomedical"


def test_completion_with_memory_matches_reference(client, ref):
    prompt = ref.tok(PROMPT)["input_ids"]
    resp = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=2,
        extra_body={"memory": "med", "alpha": 0.5, "ignore_eos": True, "return_tokens_as_token_ids": True},
    )
    assert resp.object == "text_completion" and resp.model == "tiny"
    assert resp.model_extra["memory"] == "med" and resp.model_extra["alpha"] == 0.5
    choice = resp.choices[0]
    expected, lps = greedy_reference(ref.base, ref.med, prompt, 0.5, ref.vocab, 8)
    assert ids_of(choice.logprobs.tokens) == expected
    for t, got, lp in zip(expected, choice.logprobs.token_logprobs, lps, strict=True):
        assert got == pytest.approx(float(lp[t]), abs=1e-4)
    assert choice.finish_reason == "length"
    assert resp.usage.prompt_tokens == len(prompt) and resp.usage.completion_tokens == 8
    # The same through `model` naming the memory (its alpha from the command line).
    by_name = client.completions.create(model="law", prompt=PROMPT, max_tokens=3, temperature=0)
    assert by_name.model_extra["memory"] == "law" and by_name.model_extra["alpha"] == 0.3


def test_streamed_text_equals_non_streamed_text(client):
    kwargs = dict(
        model="tiny", prompt=[PROMPT, "Once upon a time"], n=2, max_tokens=24, temperature=0.8, seed=42,
        logprobs=1, extra_body={"memory": "med", "alpha": 0.6, "ignore_eos": True},
    )
    plain = client.completions.create(**kwargs)
    stream = client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    texts: dict[int, str] = {}
    tokens: dict[int, list[str]] = {}
    finish: dict[int, str] = {}
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
            assert chunk.choices == []
            continue
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            tokens.setdefault(c.index, []).extend(c.logprobs.tokens)
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert len(plain.choices) == 4
    for c in plain.choices:
        assert texts[c.index] == c.text
        assert tokens[c.index] == c.logprobs.tokens
        assert finish[c.index] == c.finish_reason == "length"
    assert usage is not None and usage.model_dump() == plain.usage.model_dump()
    assert len({c.text for c in plain.choices}) > 1


def test_logprobs_and_echo(client):
    resp = client.completions.create(model="med", prompt=PROMPT, max_tokens=4, temperature=0, logprobs=3,
                                     echo=True, extra_body={"return_tokens_as_token_ids": True})
    lp = resp.choices[0].logprobs
    assert resp.choices[0].text.startswith(PROMPT)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x <= 0 for x in lp.token_logprobs[1:])
    assert all(3 <= len(top) <= 4 for top in lp.top_logprobs[1:])  # top-3 plus the actual token
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_perplexity_from_echo_equals_endpoint(client, server, ref):
    echo = client.completions.create(model="tiny", prompt=DOC, max_tokens=0, echo=True, logprobs=0,
                                     extra_body={"memory": "med", "alpha": 0.5})
    lps = echo.choices[0].logprobs.token_logprobs
    assert lps[0] is None
    from_echo = math.exp(-sum(lps[1:]) / len(lps[1:]))
    r = httpx.post(server.url + "/v1/perplexity", json={"input": DOC, "memory": "med", "alpha": [0.5, 0.0]},
                   headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    assert r.status_code == 200, r.text
    doc = r.json()["data"][0]
    assert doc["num_tokens"] == len(lps) - 1
    assert doc["perplexity"] == pytest.approx(from_echo, rel=1e-4)
    assert doc["alphas"][1]["perplexity"] == pytest.approx(doc["base_perplexity"], rel=1e-6)
    ids = ref.tok(DOC)["input_ids"]
    mixed = next_token_logprobs(ref.base, ref.med, ids, 0.5, ref.vocab)
    nll = -sum(float(mixed[t - 1, ids[t]]) for t in range(1, len(ids))) / (len(ids) - 1)
    assert doc["perplexity"] == pytest.approx(math.exp(nll), rel=1e-4)


def test_client_errors_surface_as_openai_exceptions(client, server):
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="tiny", prompt=PROMPT, extra_body={"memory": "med", "alpha": 2})
    assert bad.value.status_code == 400 and bad.value.body["param"] == "alpha"
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="nope", prompt=PROMPT)
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as long:
        client.completions.create(model="tiny", prompt=[5] * 510, max_tokens=10)
    assert "maximum context length is 512 tokens" in long.value.message
    with pytest.raises(openai.BadRequestError):  # refused before the stream starts: a plain 400
        client.completions.create(model="tiny", prompt=PROMPT, logprobs=50, stream=True)
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


def test_hot_swap_over_http(client, server, zoo):
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    r = httpx.post(server.url + "/v1/memories", json={"name": "fin", "path": "mem_gpt2"}, headers=admin,
                   timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["parent"] == "tiny"
    resp = client.completions.create(model="fin", prompt=PROMPT, max_tokens=3, temperature=0)
    assert resp.model_extra["memory"] == "fin" and resp.model_extra["alpha"] == 0.7
    user = {"Authorization": f"Bearer {API_KEY}"}
    assert httpx.delete(server.url + "/v1/memories/fin", headers=user).status_code == 403
    assert httpx.delete(server.url + "/v1/memories/fin", headers=admin).status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="fin", prompt=PROMPT, max_tokens=1)


def test_health_and_ready_need_no_key(server):
    assert httpx.get(server.url + "/health").json()["status"] == "ready"
    assert httpx.get(server.url + "/ready").status_code == 200


def test_sigterm_drains_in_flight_streams_and_exits_0(zoo, tmp_path):
    with serve(["--model", str(zoo.base), "--shutdown-timeout", "60"], tmp_path / "drain.log") as s:
        body = {"prompt": PROMPT, "max_tokens": 300, "ignore_eos": True, "stream": True}
        lines: list[str] = []
        started = threading.Event()

        def consume():
            with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    lines.append(line)
                    started.set()

        reader = threading.Thread(target=consume)
        reader.start()
        assert started.wait(60)
        s.proc.send_signal(signal.SIGTERM)
        # New work is refused while the stream finishes: 503 on a kept connection or no connection at all.
        refused = None
        with suppress(httpx.TransportError):
            refused = httpx.post(s.url + "/v1/completions", json={"prompt": PROMPT}, timeout=10).status_code
        assert refused in (None, 503)
        reader.join(120)
        assert s.proc.wait(60) == 0, s.logs()
    events = [line for line in lines if line]
    assert events[-1] == "data: [DONE]"
    assert '"finish_reason":"length"' in events[-2]
