"""`/v1/chat/completions` and the tokenizer endpoints on a real `memdec serve`, driven by the official
`openai` client, checked against plain HF forwards of the same model over the prompt HF's own chat rendering
gives."""

from __future__ import annotations

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from testkit.models import CHAT_TEMPLATE
from tests.api_harness import greedy_reference, ids_of

MESSAGES = [
    {"role": "system", "content": "You answer in one sentence."},
    {"role": "user", "content": "The patient was given a dose of"},
]
MODEL = "chat_base"  # the model directory's own name: no --served-model-name


@pytest.fixture(scope="module")
def server(zoo, live_server):
    args = ["--model", str(zoo.chat_base), "--memory", f"med={zoo.mem_llama}",
            "--memory", f"law={zoo.mem_qwen_padded}:0.3"]
    with live_server("chat", args) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def rendered_ids(ref, messages, **options) -> list[int]:
    """The prompt as HF renders it with the model's template, tokenized without special tokens (vLLM's
    way)."""
    options.setdefault("add_generation_prompt", True)
    text = ref.tok.apply_chat_template(messages, chat_template=CHAT_TEMPLATE, tokenize=False, **options)
    return ref.tok(text, add_special_tokens=False)["input_ids"]


def test_models_answer_under_a_typeable_name(client):
    ids = {m.id for m in client.models.list().data}
    assert ids == {MODEL, "med", "law"}  # the base by its directory's name, never the server's path


def test_greedy_chat_with_a_memory_matches_the_reference(client, ref):
    prompt = rendered_ids(ref, MESSAGES)
    resp = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_completion_tokens=8, temperature=0, logprobs=True, top_logprobs=2,
        extra_body={"memory": "med", "alpha": 0.5, "ignore_eos": True, "return_tokens_as_token_ids": True},
    )
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-") and resp.model == MODEL
    assert resp.model_extra["memory"] == "med" and resp.model_extra["alpha"] == 0.5
    choice = resp.choices[0]
    expected, lps = greedy_reference(ref.base, ref.med, prompt, 0.5, ref.vocab, 8)
    content = choice.logprobs.content
    assert ids_of([c.token for c in content]) == expected
    for t, c, lp in zip(expected, content, lps, strict=True):
        assert c.logprob == pytest.approx(float(lp[t]), abs=1e-4)
        assert (len(c.top_logprobs) == 2
                and c.top_logprobs[0].logprob == pytest.approx(float(lp.max()), abs=1e-4))
        assert c.bytes == list(c.token.encode("utf-8"))
    assert choice.message.role == "assistant"
    # (a character whose bytes the 8 tokens do not complete is held back, not sent as U+FFFD)
    assert choice.message.content == ref.tok.decode(expected, skip_special_tokens=True).rstrip("\ufffd")
    assert choice.finish_reason == "length"
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (len(prompt), 8)


def test_streamed_chat_equals_non_streamed_for_a_seed(client):
    kwargs = dict(model="med", messages=MESSAGES, n=2, max_tokens=16, temperature=0.9, seed=11, logprobs=True,
                  extra_body={"ignore_eos": True})
    plain = client.chat.completions.create(**kwargs)
    stream = client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    texts: dict[int, str] = {}
    tokens: dict[int, list[float]] = {}
    roles: dict[int, str] = {}
    finish: dict[int, str] = {}
    usage = None
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage = chunk.usage
            assert chunk.choices == []
            continue
        for c in chunk.choices:
            if c.delta.role:
                assert c.index not in roles and c.index not in texts  # the role comes first, once
                roles[c.index] = c.delta.role
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            tokens.setdefault(c.index, []).extend(t.logprob for t in c.logprobs.content)
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert roles == {0: "assistant", 1: "assistant"}
    for c in plain.choices:
        assert texts[c.index] == c.message.content
        assert tokens[c.index] == pytest.approx([t.logprob for t in c.logprobs.content], abs=1e-5)
        assert finish[c.index] == c.finish_reason == "length"
    assert usage is not None and usage.model_dump() == plain.usage.model_dump()
    assert plain.choices[0].message.content != plain.choices[1].message.content  # seed + j per sample
    assert plain.model_extra["alpha"] == 0.6  # `model` naming a memory: its manifest alpha


def test_chat_logprobs_equal_the_completions_endpoint_on_the_rendered_prompt(client, server, ref):
    r = httpx.post(server.url + "/tokenize", json={"model": "law", "messages": MESSAGES}, timeout=60)
    assert r.status_code == 200, r.text
    ids = r.json()["tokens"]
    assert ids == rendered_ids(ref, MESSAGES) and r.json()["count"] == len(ids)
    common = dict(temperature=0, extra_body={"memory": "law", "return_tokens_as_token_ids": True})
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, logprobs=True,
                                          top_logprobs=3, **common).choices[0].logprobs.content
    legacy = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, logprobs=3,
                                       **common).choices[0].logprobs
    assert [c.token for c in chat] == legacy.tokens
    for c, lp, top in zip(chat, legacy.token_logprobs, legacy.top_logprobs, strict=True):
        assert c.logprob == pytest.approx(lp, abs=1e-5)
        assert {t.token: pytest.approx(t.logprob, abs=1e-5) for t in c.top_logprobs} == {
            k: v for k, v in top.items() if k in {t.token for t in c.top_logprobs}
        }
        assert len(c.top_logprobs) == 3


def test_chat_request_options(client, ref):
    parts = [MESSAGES[0], {"role": "user", "content": [{"type": "text", "text": "The patient"},
                                                       {"type": "text", "text": "was given"}]}]
    joined = [MESSAGES[0], {"role": "user", "content": "The patient\nwas given"}]
    greedy = dict(model=MODEL, temperature=0, max_tokens=5)
    a = client.chat.completions.create(messages=parts, **greedy)
    b = client.chat.completions.create(messages=joined, **greedy)
    assert a.choices[0].message.content == b.choices[0].message.content  # text parts join with newlines
    assert a.usage.prompt_tokens == len(rendered_ids(ref, joined))
    # max_completion_tokens wins over max_tokens; without either, generation may run to the end of the
    # context.
    both = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2,
                                          max_completion_tokens=4, extra_body={"ignore_eos": True})
    assert both.usage.completion_tokens == 4
    # Continuing the assistant's message: the prompt ends inside it.
    opened = [*MESSAGES, {"role": "assistant", "content": "It was"}]
    cont = client.chat.completions.create(
        messages=opened, **greedy, extra_body={"add_generation_prompt": False, "continue_final_message": True}
    )
    assert cont.usage.prompt_tokens == len(rendered_ids(ref, opened, add_generation_prompt=False,
                                                        continue_final_message=True))
    # A stop string truncates before it, as completions do.
    free = client.chat.completions.create(messages=MESSAGES, **{**greedy, "max_tokens": 12},
                                          extra_body={"ignore_eos": True})
    text = free.choices[0].message.content
    stop = next(text[i : i + 2] for i in range(1, len(text) - 1)
                if text[i : i + 2].isprintable() and "\ufffd" not in text[i : i + 2])
    cut = client.chat.completions.create(messages=MESSAGES, **{**greedy, "max_tokens": 12}, stop=[stop],
                                         extra_body={"ignore_eos": True})
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].model_extra["stop_reason"] == stop
    # What benchmark clients send, at its neutral values, is accepted.
    neutral = client.chat.completions.create(
        messages=MESSAGES, model=MODEL, max_completion_tokens=3, stop=None, temperature=0,
        extra_body={"ignore_eos": True, "repetition_penalty": 1.0, "min_p": 0.0, "tools": [],
                    "tool_choice": "none"},
    )
    assert neutral.usage.completion_tokens == 3


@pytest.mark.parametrize(
    ("extra", "param", "code"),
    [
        ({"repetition_penalty": 1.2}, "repetition_penalty", "unsupported_parameter"),
        ({"presence_penalty": 0.5}, "presence_penalty", "unsupported_parameter"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "unsupported_parameter"),
        ({"response_format": {"type": "json_object"}}, "response_format", "unsupported_parameter"),
        ({"chat_template": "{{ messages }}"}, "chat_template", "unsupported_parameter"),
        ({"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs", None),
        ({"top_logprobs": 2}, "top_logprobs", None),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", None),
        ({"n": 17}, "n", None),
        ({"max_tokens": 600}, "max_tokens", "context_length_exceeded"),
        ({"add_generation_prompt": True, "continue_final_message": True}, "continue_final_message", None),
        ({"stream_options": {"include_usage": True}}, "stream_options", None),
        ({"alpha": 0.5}, "alpha", None),
    ],
)
def test_what_chat_cannot_honour_is_a_clear_400(server, extra, param, code):
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": MESSAGES, **extra}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error", err
    if code is not None:
        assert err["code"] == code, err


@pytest.mark.parametrize(
    ("messages", "code"),
    [
        ([{"role": "assistant", "content": "Hello"}], "chat_template_error"),  # the template's own refusal
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
         "unsupported_parameter"),
        ([{"role": "assistant", "content": "", "tool_calls": [{"id": "1"}]}], "unsupported_parameter"),
        ([{"role": "tool", "content": "42"}], None),
        ([], None),
    ],
)
def test_bad_messages_are_a_clear_400(client, messages, code):
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=messages)
    assert bad.value.body["param"].startswith("messages") and bad.value.body["code"] == code


def test_unknown_model_or_memory_is_404(client):
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="nope", messages=MESSAGES)
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, extra_body={"memory": "nope"})


def test_tokenizer_endpoints(server, ref):
    def post(path, body, status=200):
        r = httpx.post(server.url + path, json=body, timeout=60)
        assert r.status_code == status, r.text
        return r.json()

    text = "The court held that"
    out = post("/tokenize", {"prompt": text, "return_token_strs": True})
    assert (out["tokens"] == ref.encode(text) and out["count"] == len(out["tokens"])
            and out["max_model_len"] == 512)
    assert out["token_strs"] == ref.tok.convert_ids_to_tokens(out["tokens"])
    assert post("/detokenize", {"tokens": out["tokens"]})["prompt"] == text
    chat = post("/tokenize", {"messages": MESSAGES, "add_generation_prompt": False})
    assert chat["tokens"] == rendered_ids(ref, MESSAGES, add_generation_prompt=False)
    assert post("/detokenize", {"tokens": chat["tokens"]})["prompt"].endswith(
        ref.tok.eos_token + "\n"
    )  # kept
    info = httpx.get(server.url + "/tokenizer_info", timeout=60).json()
    assert info["chat_template"] == CHAT_TEMPLATE and info["eos_token"] == ref.tok.eos_token
    assert info["tokenizer_class"] and not any(str(ref.tok.name_or_path) in str(v) for v in info.values())
    assert httpx.get(server.url + "/version", timeout=60).json()["version"]
    assert post("/tokenize", {"prompt": text, "model": "nope"}, 404)["error"]["param"] == "model"
    assert post("/tokenize", {"prompt": text, "messages": MESSAGES}, 400)["error"]["param"] == "prompt"
    assert (post("/tokenize", {"prompt": text, "add_generation_prompt": True}, 400)["error"]["param"]
            == "add_generation_prompt")
    assert post("/detokenize", {"tokens": [ref.vocab]}, 400)["error"]["param"] == "tokens"
    assert post("/tokenize", {"prompt": text, "bogus": 1}, 400)["error"]["code"] == "unknown_field"


def test_chat_is_counted_as_its_own_endpoint(server, client):
    def counts():
        out = {}
        for family in text_string_to_metric_families(httpx.get(server.url + "/metrics").text):
            for s in family.samples:
                if s.name == "memdec_requests_total" and s.labels["endpoint"] == "chat":
                    out[(s.labels["status"], s.labels["finish_reason"])] = s.value
        return out

    before = counts()
    client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2,
                                   extra_body={"ignore_eos": True})
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, presence_penalty=1.0)
    after = counts()
    assert after.get(("200", "length"), 0) - before.get(("200", "length"), 0) == 1
    assert after.get(("400", "none"), 0) - before.get(("400", "none"), 0) == 1
