"""Every client mistake gets an OpenAI-shaped 4xx with `param` naming the field; nothing gets a 500;
oversized bodies 413, a full queue 429 with Retry-After, loading and failed start-up 503."""

from __future__ import annotations

import asyncio
import json
import random
import threading

import pytest

import server.api.state as state_module
from server.config import EngineConfig, MemorySpec, ModelConfig, ServerConfig
from tests.api_harness import InProcessServer, assert_error, sse_events

PROMPT = "The court held that"
DOC = "The committee expects inflation to remain near two percent."
BODY_LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def server(zoo):
    config = ServerConfig(
        model=ModelConfig(str(zoo.base)),
        memories=(MemorySpec("med", str(zoo.mem_llama)), MemorySpec("law", str(zoo.mem_qwen_padded))),
        enable_admin=True,
        memory_root=zoo.base.parent,
        max_body_bytes=BODY_LIMIT,
    )
    with InProcessServer(config) as s:
        yield s


COMPLETION_ERRORS = [
    # (body, status, param, code)
    ({"prompt": PROMPT, "memory": "med", "alpha": 1.5}, 400, "alpha", None),
    ({"prompt": PROMPT, "memory": "med", "alpha": -0.1}, 400, "alpha", None),
    ({"prompt": PROMPT, "alpha": 0.5}, 400, "alpha", None),
    ({"prompt": PROMPT, "memory": None, "alpha": 0.5}, 400, "alpha", None),
    ({"prompt": PROMPT, "logprobs": 21}, 400, "logprobs", None),
    ({"prompt": PROMPT, "logprobs": -1}, 400, "logprobs", None),
    ({"prompt": PROMPT, "stop": ""}, 400, "stop", None),
    ({"prompt": PROMPT, "stop": ["ok", ""]}, 400, "stop", None),
    ({"prompt": PROMPT, "stop": [1]}, 400, "stop", None),
    ({"prompt": PROMPT, "stop": ["s"] * 17}, 400, "stop", None),
    ({"prompt": PROMPT, "max_tokens": 600}, 400, "max_tokens", "context_length_exceeded"),
    ({"prompt": [5] * 500, "max_tokens": 20}, 400, "max_tokens", "context_length_exceeded"),
    ({"prompt": [5] * 513, "max_tokens": 0, "echo": True}, 400, "max_tokens", "context_length_exceeded"),
    ({"prompt": PROMPT, "max_tokens": -1}, 400, "max_tokens", None),
    ({"prompt": [1, 100000]}, 400, "prompt", None),
    ({"prompt": [-1]}, 400, "prompt", None),
    ({"prompt": [[1, 2], [3, 99999]]}, 400, "prompt", None),
    ({"prompt": [1, "a"]}, 400, "prompt", None),
    ({"prompt": [True, False]}, 400, "prompt", None),
    ({"prompt": [1.5]}, 400, "prompt", None),
    ({"prompt": ""}, 400, "prompt", None),
    ({"prompt": []}, 400, "prompt", None),
    ({"prompt": [[]]}, 400, "prompt", None),
    ({"prompt": ["ok", ""]}, 400, "prompt", None),
    ({"prompt": {"text": "x"}}, 400, "prompt", None),
    ({"prompt": ["a"] * 257}, 400, "prompt", None),
    ({}, 400, "prompt", "missing_field"),
    ({"prompt": PROMPT, "n": 0}, 400, "n", None),
    ({"prompt": PROMPT, "n": 17}, 400, "n", None),
    ({"prompt": ["a"] * 20, "n": 16}, 400, "n", None),
    ({"prompt": PROMPT, "temperature": -1}, 400, "temperature", None),
    ({"prompt": PROMPT, "top_p": 0}, 400, "top_p", None),
    ({"prompt": PROMPT, "top_p": 1.5}, 400, "top_p", None),
    ({"prompt": PROMPT, "top_k": -2}, 400, "top_k", None),
    ({"prompt": PROMPT, "seed": 2**64}, 400, "seed", None),
    ({"prompt": PROMPT, "stream": "sometimes"}, 400, "stream", None),
    ({"prompt": PROMPT, "echo": [1]}, 400, "echo", None),
    ({"prompt": PROMPT, "stream_options": {"include_usage": True}}, 400, "stream_options", None),
    ({"prompt": PROMPT, "stream": True, "stream_options": {"include_usage": "x"}},
     400, "stream_options.include_usage", None),
    ({"prompt": PROMPT, "stream": True, "stream_options": 3}, 400, "stream_options", None),
    ({"prompt": PROMPT, "model": "nope"}, 404, "model", "model_not_found"),
    ({"prompt": PROMPT, "memory": "nope"}, 404, "memory", "memory_not_found"),
    ({"prompt": PROMPT, "model": "med", "memory": "law"}, 400, "memory", None),
    ({"prompt": PROMPT, "model": "med", "memory": None}, 400, "memory", None),
    ({"prompt": PROMPT, "presence_penalty": 0.5}, 400, "presence_penalty", None),
    ({"prompt": PROMPT, "frequency_penalty": -1}, 400, "frequency_penalty", None),
    ({"prompt": PROMPT, "logit_bias": {"1": 5}}, 400, "logit_bias", None),
    ({"prompt": PROMPT, "suffix": "end"}, 400, "suffix", None),
    ({"prompt": PROMPT, "best_of": 3}, 400, "best_of", None),
    ({"prompt": PROMPT, "stop_token_ids": [100000]}, 400, "stop_token_ids", None),
    ({"prompt": PROMPT, "stop_token_ids": "1"}, 400, "stop_token_ids", None),
    ({"prompt": PROMPT, "model": 7}, 400, "model", None),
    # JSON booleans are not counts: integer fields are strict (pydantic would otherwise read true as 1).
    ({"prompt": PROMPT, "n": True}, 400, "n", None),
    ({"prompt": PROMPT, "max_tokens": True}, 400, "max_tokens", None),
    ({"prompt": PROMPT, "logprobs": True}, 400, "logprobs", None),
    ({"prompt": PROMPT, "top_k": False}, 400, "top_k", None),
    ({"prompt": PROMPT, "seed": True}, 400, "seed", None),
    # ... nor are they numbers: float fields take JSON numbers (integers included) only.
    ({"prompt": PROMPT, "temperature": True}, 400, "temperature", None),
    ({"prompt": PROMPT, "memory": "med", "alpha": True}, 400, "alpha", None),
    ({"prompt": PROMPT, "presence_penalty": False}, 400, "presence_penalty", None),
    # Several memories: alpha required, one per memory, summing to at most 1; names known and distinct.
    ({"prompt": PROMPT, "memory": ["med", "law"]}, 400, "alpha", None),
    ({"prompt": PROMPT, "memory": ["med", "law"], "alpha": 0.3}, 400, "alpha", None),
    ({"prompt": PROMPT, "memory": ["med", "law"], "alpha": [0.3]}, 400, "alpha", None),
    ({"prompt": PROMPT, "memory": ["med", "law"], "alpha": [0.3, 0.3, 0.3]}, 400, "alpha", None),
    ({"prompt": PROMPT, "memory": ["med", "law"], "alpha": [0.6, 0.5]}, 400, "alpha", None),
    ({"prompt": PROMPT, "memory": ["med", "law"], "alpha": [0.6, 1.5]}, 400, "alpha", None),
    ({"prompt": PROMPT, "memory": ["med", "med"], "alpha": [0.3, 0.3]}, 400, "memory", None),
    ({"prompt": PROMPT, "memory": ["med", "nope"], "alpha": [0.3, 0.3]}, 404, "memory", "memory_not_found"),
    ({"prompt": PROMPT, "memory": []}, 400, "memory", None),
    ({"prompt": PROMPT, "memory": ["med"] * 9}, 400, "memory", None),
    ({"prompt": PROMPT, "memory": ["med", 3]}, 400, "memory", None),
    ({"prompt": PROMPT, "model": "med", "memory": ["med", "law"], "alpha": [0.3, 0.3]}, 400, "memory", None),
    ({"prompt": PROMPT, "memory": ["med", "law"], "alpha": [0.3, 0.3], "memory_temperature": [1.0]},
     400, "memory_temperature", None),
    ({"prompt": PROMPT, "memory": ["med", "law"], "alpha": [0.3, 0.3], "memory_temperature": [1.0, 0]},
     400, "memory_temperature", None),
    ({"prompt": PROMPT, "memory": "med", "alpha": [0.3, 0.3]}, 400, "alpha", None),
    ({"prompt": PROMPT, "memory": "med", "memory_temperature": [1.0, 2.0]}, 400, "memory_temperature", None),
    ({"prompt": PROMPT, "memory_temperature": [1.0]}, 400, "memory_temperature", None),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("body,status,param,code", COMPLETION_ERRORS)
def test_completion_errors(server, body, status, param, code, stream):
    if stream and "stream" not in body and "stream_options" not in body:
        body = {**body, "stream": True}  # refused before the stream starts: a plain error, not SSE
    assert_error(server.post("/v1/completions", body), status, param, code)


def test_context_length_message_reads_like_vllm(server):
    err = assert_error(server.post("/v1/completions", {"prompt": [5] * 500, "max_tokens": 20}), 400,
                       "max_tokens")
    assert "maximum context length is 512 tokens" in err["message"]
    assert "520 tokens (500 in the messages, 20 in the completion)" in err["message"]
    assert err["type"] == "invalid_request_error"


PERPLEXITY_ERRORS = [
    ({"input": DOC, "alpha": 0.5}, 400, "alpha", None),
    ({"input": DOC, "memory": "med", "alpha": [0.5, 2]}, 400, "alpha", None),
    ({"input": DOC, "memory": "med", "alpha": []}, 400, "alpha", None),
    ({"input": DOC, "memory": "med", "alpha": [0.5] * 33}, 400, "alpha", None),
    ({"input": DOC, "memory": "med", "alpha": "high"}, 400, "alpha", None),
    ({"input": DOC, "memory": ["med", "law"]}, 400, "alpha", None),
    ({"input": DOC, "memory": ["med", "law"], "alpha": [0.3]}, 400, "alpha", None),
    ({"input": DOC, "memory": ["med", "law"], "alpha": [0.7, 0.4]}, 400, "alpha", None),
    ({"input": DOC, "memory": ["med", "med"], "alpha": [0.3, 0.3]}, 400, "memory", None),
    ({"input": DOC, "memory": ["med", "law"], "alpha": [0.3, 0.3], "logprobs": 2}, 400, "logprobs", None),
    ({"input": DOC, "memory": ["med", "law"], "alpha": [0.3, 0.3], "memory_temperature": [1, 2, 3]},
     400, "memory_temperature", None),
    ({"input": DOC, "context_length": 1}, 400, "context_length", None),
    ({"input": DOC, "context_length": 100000}, 400, "context_length", None),
    ({"input": DOC, "stride": 0}, 400, "stride", None),
    ({"input": DOC, "stride": True}, 400, "stride", None),
    ({"input": DOC, "max_windows": True}, 400, "max_windows", None),
    ({"input": DOC, "context_length": 8, "stride": 9}, 400, "stride", None),
    ({"input": DOC, "memory": "nope"}, 404, "memory", "memory_not_found"),
    ({"input": DOC, "model": "nope"}, 404, "model", "model_not_found"),
    ({"input": [1, 999999]}, 400, "input", None),
    ({"input": [7]}, 400, "input", None),
    ({"input": ""}, 400, "input", None),
    ({"input": []}, 400, "input", None),
    ({"input": DOC, "bogus": 1}, 400, "bogus", "unknown_field"),
    ({}, 400, "input", "missing_field"),
]


@pytest.mark.parametrize("body,status,param,code", PERPLEXITY_ERRORS)
def test_perplexity_errors(server, body, status, param, code):
    assert_error(server.post("/v1/perplexity", body), status, param, code)


MEMORY_ERRORS = [
    ({"name": "x"}, 400, "path", "missing_field"),
    ({"name": "", "path": "mem_gpt2"}, 400, "name", None),
    ({"name": "x", "path": "does-not-exist"}, 400, "path", None),
    ({"name": "x", "path": "tokenizer"}, 400, "path", None),  # a directory, but no memdec.json
    ({"name": "x", "path": "mem_gpt2", "alpha": 3}, 400, "alpha", None),
    ({"name": "med", "path": "mem_gpt2"}, 409, "name", None),
]


@pytest.mark.parametrize("body,status,param,code", MEMORY_ERRORS)
def test_memory_load_errors(server, body, status, param, code):
    assert_error(server.post("/v1/memories", body), status, param, code)
    assert sorted(c["id"] for c in server.get("/v1/memories").json()["data"]) == ["law", "med"]


def test_unloading_an_unknown_memory_is_404(server):
    assert_error(server.delete("/v1/memories/nope"), 404)


RAW_BODIES = [
    # (content, content-type, code)
    (b'{"prompt": ', "application/json", "invalid_json"),
    (b'{"prompt": "x",}', "application/json", "invalid_json"),
    (b"\xff\xfe garbage", "application/json", "invalid_json"),
    (b"[]", "application/json", "invalid_body"),
    (b'"just a string"', "application/json", "invalid_body"),
    (b"null", "application/json", "invalid_body"),
    (b"", "application/json", "missing_body"),
    (b'{"prompt": "x"}', None, "invalid_body"),
    (b"prompt=x", "application/x-www-form-urlencoded", "invalid_body"),
    (b'{"prompt": "x"}', "text/plain", "invalid_body"),
]


@pytest.mark.parametrize("content,content_type,code", RAW_BODIES)
def test_malformed_bodies_are_400_not_422(server, content, content_type, code):
    headers = {"content-type": content_type} if content_type else {}
    for path in ("/v1/completions", "/v1/perplexity"):
        err = assert_error(server.post(path, content=content, headers=headers), 400, code=code)
        assert err["param"] is None and err["type"] == "invalid_request_error"


@pytest.mark.parametrize("raw,param", [
    (b'{"prompt": "x", "temperature": NaN}', "temperature"),
    (b'{"prompt": "x", "memory": "med", "alpha": Infinity}', "alpha"),
    (b'{"prompt": "x", "top_p": -Infinity}', "top_p"),
])  # fmt: skip  # a table: one row per case
def test_non_finite_numbers_are_refused(server, raw, param):
    r = server.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert_error(r, 400, param)


def test_oversized_bodies_are_413(server):
    big = {"prompt": "x" * (BODY_LIMIT + 10)}
    err = assert_error(server.post("/v1/completions", big), 413, code="request_too_large")
    assert str(BODY_LIMIT) in err["message"]

    async def chunks():  # no Content-Length: the size is only known while reading
        for _ in range(BODY_LIMIT // 1024 + 2):
            yield b" " * 1024

    r = server.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in r.request.headers
    assert_error(r, 413, code="request_too_large")
    # just under the limit is parsed normally (and here refused for its content, not its size)
    ok = json.dumps({"prompt": [5] * 600, "max_tokens": 0}).encode()
    assert len(ok) < BODY_LIMIT
    assert_error(server.post("/v1/completions", content=ok, headers={"content-type": "application/json"}),
                 400)


def test_unknown_paths_and_methods(server):
    err = assert_error(server.get("/v1/nothing"), 404)
    assert err["type"] == "not_found_error"
    assert_error(server.get("/v1/completions"), 405)
    assert_error(server.delete("/v1/models"), 405)


FUZZ_VALUES = [None, True, False, 0, -1, 1, 0.5, 1e-300, 5e-324, 2**70, -(2**70), 1e300, "", "x", [], [1],
               ["a"], [[1]], {}, {"a": 1}]
FUZZ_FIELDS = [
    "model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "stream", "stream_options",
    "logprobs", "echo", "stop", "stop_token_ids", "seed", "ignore_eos", "user", "memory", "alpha",
    "presence_penalty", "frequency_penalty", "logit_bias", "suffix", "best_of", "return_tokens_as_token_ids",
    "speculative",
]


def test_fuzzed_completion_fields_never_give_5xx(server):
    rng = random.Random(1234)
    base = {"prompt": "Once", "max_tokens": 2}
    bodies = [{**base, field: value} for field in FUZZ_FIELDS for value in FUZZ_VALUES]
    bodies += [{f: rng.choice(FUZZ_VALUES) for f in rng.sample(FUZZ_FIELDS, 4)} | {"prompt": "x"}
               for _ in range(150)]

    async def run_all():
        sem = asyncio.Semaphore(16)

        async def one(body):
            async with sem:
                return body, await server.client.post("/v1/completions", json=body)

        return await asyncio.gather(*(one(b) for b in bodies))

    statuses = {}
    for body, r in server.call(run_all):
        assert r.status_code < 500, (body, r.text)
        if r.status_code != 200:
            assert_error(r, r.status_code)
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
    assert statuses.get(200) and statuses.get(400)  # the fuzz reached both sides
    assert server.serving.engine.is_alive
    assert server.get("/health").status_code == 200


@pytest.mark.parametrize("path,base,fields", [
    ("/v1/perplexity", {"input": DOC}, ["model", "memory", "alpha", "input", "context_length", "stride"]),
    ("/v1/memories", {"name": "z", "path": "mem_gpt2"}, ["name", "path", "alpha"]),
])  # fmt: skip  # a table: one row per case
def test_fuzzed_other_endpoints_never_give_5xx(server, path, base, fields):
    for field in fields:
        for value in FUZZ_VALUES:
            body = {**base, field: value}
            r = server.post(path, body)
            assert r.status_code < 500, (body, r.text)
            if r.status_code != 200:
                assert_error(r, r.status_code)
            elif path == "/v1/memories":
                assert server.delete(f"/v1/memories/{r.json()['id']}").status_code == 200
    assert server.get("/health").status_code == 200


def test_queue_full_is_429_with_retry_after(zoo):
    config = ServerConfig(model=ModelConfig(str(zoo.base)), engine=EngineConfig(max_num_seqs=1), max_queue=1)
    with InProcessServer(config) as s:
        body = {"prompt": PROMPT, "max_tokens": 300, "ignore_eos": True}

        async def burst(stream: bool):
            return await asyncio.gather(
                *(s.client.post("/v1/completions", json={**body, "stream": stream}) for _ in range(5))
            )

        for stream in (False, True):
            responses = s.call(burst, stream)
            codes = sorted(r.status_code for r in responses)
            assert 200 in codes and 429 in codes and set(codes) <= {200, 429}, codes
            for r in responses:
                if r.status_code == 429:
                    err = assert_error(r, 429)
                    assert err["type"] == "rate_limit_error"
                    assert int(r.headers["retry-after"]) >= 1
                else:
                    assert (r.text.endswith("data: [DONE]\n\n") if stream
                            else r.json()["usage"]["completion_tokens"] == 300)
        assert s.serving.engine.num_waiting == 0 and s.serving.engine.num_running == 0


def test_503_while_loading_then_ready(zoo, monkeypatch):
    release = threading.Event()
    real = state_module.load_base

    def slow_load(*args, **kwargs):
        release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(state_module, "load_base", slow_load)
    with InProcessServer(ServerConfig(model=ModelConfig(str(zoo.base))), wait=False) as s:
        health = s.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "loading"
        for r in (s.get("/ready"), s.get("/v1/models"), s.post("/v1/completions", {"prompt": "x"})):
            assert_error(r, 503, code="model_loading")
            assert r.headers["retry-after"] == "5"
        release.set()
        s.wait_ready()
        assert s.get("/health").json()["status"] == "ready"
        assert s.post("/v1/completions", {"prompt": "x", "max_tokens": 1}).status_code == 200


def test_failed_start_up_is_503_with_the_reason(tmp_path):
    with InProcessServer(ServerConfig(model=ModelConfig(str(tmp_path / "missing"))), wait=False) as s:
        for _ in range(200):
            if s.state.phase.value == "failed":
                break
            threading.Event().wait(0.05)
        err = assert_error(s.get("/health"), 503, code="startup_failed")
        assert "missing" in err["message"]
        assert_error(s.get("/ready"), 503, code="startup_failed")
        assert_error(s.post("/v1/completions", {"prompt": "x"}), 503)


def test_bad_startup_memory_fails_start_up(zoo):
    config = ServerConfig(model=ModelConfig(str(zoo.base)),
                          memories=(MemorySpec("alien", str(zoo.mem_foreign)),))
    with InProcessServer(config, wait=False) as s:
        for _ in range(200):
            if s.state.phase.value == "failed":
                break
            threading.Event().wait(0.05)
        err = assert_error(s.get("/health"), 503, code="startup_failed")
        assert "tokenizer" in err["message"]


def test_engine_stopping_mid_request_gives_error_frame_then_done_and_health_503(zoo):
    import openai

    with InProcessServer(ServerConfig(model=ModelConfig(str(zoo.base)))) as s:
        body = {"prompt": PROMPT, "max_tokens": 400, "ignore_eos": True}
        client = openai.AsyncOpenAI(base_url="http://memdec.test/v1", api_key="x", http_client=s.client,
                                    max_retries=0)

        async def openai_stream():
            stream = await client.completions.create(model="base", prompt=PROMPT, max_tokens=400, stream=True,
                                                     extra_body={"ignore_eos": True})
            return [chunk async for chunk in stream]

        async def scenario():
            engine = s.serving.engine
            async with s.client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                assert r.status_code == 200
                lines = r.aiter_lines()
                first = await anext(lines)
                plain = asyncio.ensure_future(s.client.post("/v1/completions", json=body))
                via_openai = asyncio.ensure_future(openai_stream())
                while engine.num_running < 3:
                    await asyncio.sleep(0.01)
                await asyncio.to_thread(engine.shutdown)  # the engine loop ends under all three requests
                rest = [line async for line in lines]
            results = await asyncio.gather(plain, via_openai, return_exceptions=True)
            return first, rest, *results

        first, rest, plain, via_openai = s.call(scenario)
        events = sse_events("\n".join([first, *rest]) + "\n")
        assert events[-1] == "[DONE]"
        err = events[-2]
        assert set(err) == {"error"} and set(err["error"]) == {"message", "type", "param", "code"}
        assert "shut down" in err["error"]["message"]
        assert all("choices" in e for e in events[:-2])
        # The engine hands callers the ServiceUnavailableError itself, not a per-request ERROR finish.
        assert "shut down" in assert_error(plain, 503)["message"]
        assert isinstance(via_openai, openai.APIError)  # the official client raises on the error frame
        assert "shut down" in via_openai.message
        assert_error(s.get("/health"), 503, code="engine_dead")
        assert_error(s.get("/ready"), 503, code="engine_dead")
