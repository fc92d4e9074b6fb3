"""The HTTP API in process (real app, real engine, tiny models): every completions field, perplexity,
model cards and disconnects, checked against plain HF forwards mixed by the paper's formula."""

from __future__ import annotations

import asyncio
import math
import time

import pytest
import torch

from server.config import EngineConfig, MemorySpec, ModelConfig, ServerConfig
from tests.api_harness import (
    InProcessServer,
    assert_error,
    greedy_reference,
    ids_of,
    next_token_logprobs,
    sse_events,
)

PROMPT = "The patient was given a dose of"


@pytest.fixture(scope="module")
def server(zoo):
    config = ServerConfig(
        model=ModelConfig(str(zoo.base)),
        engine=EngineConfig(max_num_seqs=16),
        memories=(MemorySpec("med", str(zoo.mem_llama)), MemorySpec("law", str(zoo.mem_qwen_padded))),
        served_model_name="tiny-base",
    )
    with InProcessServer(config) as s:
        yield s


# -- model cards ---------------------------------------------------------------------------------


def test_models_lists_base_and_memories(server, zoo):
    r = server.get("/v1/models")
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list"
    cards = {c["id"]: c for c in body["data"]}
    assert set(cards) == {"tiny-base", "med", "law"}
    base = cards["tiny-base"]
    assert base["object"] == "model" and base["owned_by"] == "memdec"
    assert base["root"] == str(zoo.base) and base["parent"] is None and base["max_model_len"] == 512
    assert isinstance(base["created"], int)
    med, law = cards["med"], cards["law"]
    assert med["parent"] == law["parent"] == "tiny-base"
    assert med["root"] == str(zoo.mem_llama) and law["root"] == str(zoo.mem_qwen_padded)
    assert (med["alpha"], med["domain"]) == (0.6, "biomedical")
    assert (law["alpha"], law["domain"]) == (0.4, "legal")
    assert med["max_model_len"] == 512
    assert server.get("/v1/models/tiny-base").json() == base
    assert server.get("/v1/models/med").json() == med
    assert_error(server.get("/v1/models/nope"), 404, "model", "model_not_found")
    memories = server.get("/v1/memories").json()
    assert sorted(c["id"] for c in memories["data"]) == ["law", "med"]


# -- completions against references -------------------------------------------------------------


def test_greedy_base_alone_matches_hf_generate(server, ref):
    prompt = ref.encode(PROMPT)
    out = server.complete(
        model="tiny-base", prompt=PROMPT, max_tokens=12, temperature=0, ignore_eos=True,
        logprobs=0, return_tokens_as_token_ids=True,
    )
    assert out["object"] == "text_completion" and out["id"].startswith("cmpl-")
    assert out["model"] == "tiny-base" and out["memory"] is None and out["alpha"] is None
    choice = out["choices"][0]
    with torch.no_grad():
        expected = ref.base.generate(
            torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=ref.tok.eos_token_id,
            eos_token_id=None,
        )[0, len(prompt):].tolist()
    assert ids_of(choice["logprobs"]["tokens"]) == expected
    assert choice["finish_reason"] == "length"
    assert out["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 12,
                            "total_tokens": len(prompt) + 12}


@pytest.mark.parametrize("memory,alpha", [("med", 0.5), ("law", 0.25), ("med", 1.0)])
def test_greedy_with_memory_matches_reference_mixture(server, ref, memory, alpha):
    prompt = ref.encode(PROMPT)
    out = server.complete(
        prompt=prompt, memory=memory, alpha=alpha, max_tokens=8, temperature=0, ignore_eos=True,
        logprobs=3, return_tokens_as_token_ids=True,
    )
    assert (out["memory"], out["alpha"]) == (memory, alpha)
    lp = out["choices"][0]["logprobs"]
    expected, ref_lps = greedy_reference(ref.base, getattr(ref, memory), prompt, alpha, ref.vocab, 8)
    assert ids_of(lp["tokens"]) == expected
    for t, chosen, got, top in zip(expected, lp["token_logprobs"], ref_lps, lp["top_logprobs"], strict=True):
        assert chosen == pytest.approx(float(top_ref := got[t]), abs=1e-4), top_ref
        values, ids = got.topk(3)
        want = {f"token_id:{i}": v for i, v in zip(ids.tolist(), values.tolist(), strict=True)}
        assert set(top) == set(want)  # greedy: the chosen token is the top one, so exactly 3 entries
        for k, v in want.items():
            assert top[k] == pytest.approx(v, abs=1e-4)


def test_model_naming_a_memory_uses_its_manifest_alpha(server, ref):
    by_model = server.complete(model="law", prompt=PROMPT, max_tokens=6, temperature=0, ignore_eos=True)
    assert (by_model["model"], by_model["memory"], by_model["alpha"]) == ("law", "law", 0.4)
    explicit = server.complete(model="tiny-base", memory="law", alpha=0.4, prompt=PROMPT, max_tokens=6,
                               temperature=0, ignore_eos=True)
    assert by_model["choices"][0]["text"] == explicit["choices"][0]["text"]
    default_alpha = server.complete(memory="med", prompt=PROMPT, max_tokens=1)
    assert default_alpha["alpha"] == 0.6
    # A memory as `model` with another `alpha` runs that alpha.
    assert server.complete(model="med", alpha=0.1, prompt=PROMPT, max_tokens=1)["alpha"] == 0.1
    # `memory: null` next to the base model is the base alone.
    assert server.complete(model="tiny-base", memory=None, prompt=PROMPT, max_tokens=1)["memory"] is None


def test_echo_with_zero_max_tokens_scores_the_prompt(server, ref):
    prompt = ref.encode(PROMPT)
    out = server.complete(prompt=PROMPT, memory="med", alpha=0.3, echo=True, max_tokens=0, logprobs=2)
    choice = out["choices"][0]
    assert choice["text"] == PROMPT and choice["finish_reason"] == "length"
    lp = choice["logprobs"]
    assert "".join(lp["tokens"]) == PROMPT
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(prompt))]
    mixed = next_token_logprobs(ref.base, ref.med, prompt, 0.3, ref.vocab)  # [T, V]
    by_id = server.complete(
        prompt=PROMPT, memory="med", alpha=0.3, echo=True, max_tokens=0, logprobs=2,
        return_tokens_as_token_ids=True
    )["choices"][0]["logprobs"]
    assert ids_of(by_id["tokens"]) == prompt
    for t in range(1, len(prompt)):
        assert lp["token_logprobs"][t] == pytest.approx(float(mixed[t - 1, prompt[t]]), abs=1e-4)
        # Texts of distinct tokens may coincide; the best log-prob per text stays the best overall.
        assert max(lp["top_logprobs"][t].values()) == pytest.approx(float(mixed[t - 1].max()), abs=1e-4)
        values, ids = mixed[t - 1].topk(2)
        want = {f"token_id:{i}": v for i, v in zip(ids.tolist(), values.tolist(), strict=True)}
        # the prompt's own token is always there
        want[f"token_id:{prompt[t]}"] = float(mixed[t - 1, prompt[t]])
        top = by_id["top_logprobs"][t]
        assert set(top) == set(want)
        for k, v in want.items():
            assert top[k] == pytest.approx(v, abs=1e-4)
    assert out["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 0, "total_tokens": len(prompt)}


def test_echo_with_generation_returns_prompt_then_completion(server, ref):
    prompt = ref.encode(PROMPT)
    plain = server.complete(prompt=PROMPT, max_tokens=4, temperature=0, ignore_eos=True, logprobs=1)
    echo = server.complete(prompt=PROMPT, max_tokens=4, temperature=0, ignore_eos=True, logprobs=1, echo=True)
    assert echo["choices"][0]["text"] == PROMPT + plain["choices"][0]["text"]
    lp, plain_lp = echo["choices"][0]["logprobs"], plain["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(prompt) + 4
    assert lp["tokens"][len(prompt):] == plain_lp["tokens"]
    assert lp["token_logprobs"][len(prompt):] == pytest.approx(plain_lp["token_logprobs"], abs=1e-5)
    assert plain_lp["text_offset"][0] == 0
    # Without logprobs, echo still prepends the prompt and there is no logprobs object.
    bare = server.complete(prompt=prompt, max_tokens=2, temperature=0, echo=True)
    assert bare["choices"][0]["logprobs"] is None and bare["choices"][0]["text"].startswith(PROMPT)


def test_prompt_shapes_and_choice_indices(server, ref):
    texts = ["The court held that", "Once upon a time"]
    ids = [ref.encode(t) for t in texts]
    by_text = server.complete(prompt=texts, n=2, max_tokens=5, temperature=0, ignore_eos=True)
    by_ids = server.complete(prompt=ids, n=2, max_tokens=5, temperature=0, ignore_eos=True)
    single = server.complete(prompt=ids[1], max_tokens=5, temperature=0, ignore_eos=True)
    for out in (by_text, by_ids):
        assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
        assert out["usage"]["prompt_tokens"] == len(ids[0]) + len(ids[1])
        assert out["usage"]["completion_tokens"] == 20
    assert [c["text"] for c in by_text["choices"]] == [c["text"] for c in by_ids["choices"]]
    # choice index = prompt index * n + sample index
    assert by_ids["choices"][2]["text"] == by_ids["choices"][3]["text"] == single["choices"][0]["text"]
    # A token-id prompt is echoed as its decoded text.
    echoed = server.complete(prompt=ids[0], max_tokens=0, echo=True)
    assert echoed["choices"][0]["text"] == ref.tok.decode(ids[0])


def test_seeded_sampling_is_reproducible_and_n_uses_consecutive_seeds(server):
    body = dict(prompt=PROMPT, n=3, seed=11, temperature=1.0, max_tokens=10, ignore_eos=True, memory="med")
    first = server.complete(**body)
    again = server.complete(**body)
    texts = [c["text"] for c in first["choices"]]
    assert texts == [c["text"] for c in again["choices"]]
    for j in range(3):
        alone = server.complete(**{**body, "n": 1, "seed": 11 + j})
        assert alone["choices"][0]["text"] == texts[j]
    assert len(set(texts)) > 1  # different seeds sample differently (10 tokens from peaked but not one-hot)


def test_max_tokens_defaults_to_16(server):
    out = server.complete(prompt=PROMPT, ignore_eos=True)
    assert out["usage"]["completion_tokens"] == 16 and out["choices"][0]["finish_reason"] == "length"


def test_stop_string_truncates_before_it(server):
    full = server.complete(prompt=PROMPT, max_tokens=16, temperature=0, ignore_eos=True)["choices"][0]["text"]
    start = len(full) // 2
    stop = full[start : start + 2]
    cut = full.find(stop)
    out = server.complete(prompt=PROMPT, max_tokens=16, temperature=0, ignore_eos=True,
                          stop=[stop, "never-seen"])
    choice = out["choices"][0]
    assert choice["text"] == full[:cut]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == stop
    # `stop` as a single string works the same
    assert server.complete(prompt=PROMPT, max_tokens=16, temperature=0, ignore_eos=True,
                           stop=stop)["choices"][0]["text"] == full[:cut]


def test_stop_token_ids_end_generation(server):
    out = server.complete(
        prompt=PROMPT, max_tokens=12, temperature=0, ignore_eos=True, logprobs=0,
        return_tokens_as_token_ids=True
    )
    ids = ids_of(out["choices"][0]["logprobs"]["tokens"])
    stop_id = ids[5]
    first = ids.index(stop_id)
    stopped = server.complete(prompt=PROMPT, max_tokens=12, temperature=0, ignore_eos=True,
                              stop_token_ids=[stop_id])
    choice = stopped["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == stop_id
    assert stopped["usage"]["completion_tokens"] == first + 1


def test_top_k_top_p_and_large_top_k(server):
    greedy = server.complete(prompt=PROMPT, max_tokens=6, temperature=0,
                             ignore_eos=True)["choices"][0]["text"]
    # top_k = 1, a tiny top_p or a vanishing temperature leave only the most likely token: greedy.
    for extra in ({"top_k": 1}, {"top_p": 1e-6}, {"temperature": 1e-30}, {"temperature": 5e-324}):
        out = server.complete(**{"prompt": PROMPT, "max_tokens": 6, "temperature": 1.0, "seed": 3,
                                 "ignore_eos": True, **extra})
        assert out["choices"][0]["text"] == greedy
    assert server.post("/v1/completions",
                       {"prompt": PROMPT, "max_tokens": 2, "top_k": 10**6}).status_code == 200
    assert server.post("/v1/completions", {"prompt": PROMPT, "max_tokens": 2, "top_k": -1}).status_code == 200


def test_unknown_fields_are_ignored_and_user_accepted(server):
    r = server.post("/v1/completions", {"prompt": PROMPT, "max_tokens": 1, "user": "u1", "min_tokens": 0})
    assert r.status_code == 200


def test_lm_eval_harness_loglikelihood_flow(server, ref):
    """What lm-eval-harness's `local-completions` sends for loglikelihood, and how it reads the answer."""
    pairs = [("The court held that", " the statute applies"), ("Once upon a time", " there was a house")]
    prompts, ctxlens = [], []
    for context, continuation in pairs:
        ctx, cont = ref.encode(context), ref.encode(continuation)
        prompts.append(ctx + cont)
        ctxlens.append(len(ctx))
    ctx = ref.encode(PROMPT)  # a continuation that is the model's own greedy choice: is_greedy must be True
    prompts.append(ctx + greedy_reference(ref.base, ref.med, ctx, 0.6, ref.vocab, 4)[0])
    ctxlens.append(len(ctx))
    greedy_seen = []
    out = server.complete(model="med", prompt=prompts, temperature=0, max_tokens=1, logprobs=1, seed=1234,
                          echo=True)
    for choice, ids, ctxlen in zip(sorted(out["choices"], key=lambda c: c["index"]), prompts, ctxlens,
                                   strict=True):
        lps = choice["logprobs"]["token_logprobs"][ctxlen:-1]  # the last entry is the generated token
        tops = choice["logprobs"]["top_logprobs"][ctxlen:-1]
        is_greedy = all(lp == max(top.values()) for lp, top in zip(lps, tops, strict=True))
        mixed = next_token_logprobs(ref.base, ref.med, ids, 0.6, ref.vocab)  # [T, V]
        want = sum(float(mixed[t - 1, ids[t]]) for t in range(ctxlen, len(ids)))
        assert sum(lps) == pytest.approx(want, abs=1e-3)
        assert is_greedy == all(int(mixed[t - 1].argmax()) == ids[t] for t in range(ctxlen, len(ids)))
        greedy_seen.append(is_greedy)
    assert greedy_seen[-1] is True


# -- streaming -------------------------------------------------------------------------------------


def _stream(server, body):
    r = server.post("/v1/completions", {**body, "stream": True})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    return events[:-1]


def test_stream_equals_non_stream_for_the_same_seed(server):
    body = dict(
        prompt=["The court held that", PROMPT], n=2, seed=5, temperature=0.9, max_tokens=20, memory="med",
        alpha=0.7, logprobs=1, ignore_eos=True,
    )
    plain = server.complete(**body)
    chunks = _stream(server, {**body, "stream_options": {"include_usage": True}})
    *deltas, usage_chunk = chunks
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == plain["usage"]
    texts, tokens, lps, finish = {}, {}, {}, {}
    for c in deltas:
        assert c["id"] == deltas[0]["id"] and c["object"] == "text_completion"
        assert (c["memory"], c["alpha"]) == ("med", 0.7)
        assert c["usage"] is None
        (choice,) = c["choices"]
        i = choice["index"]
        texts[i] = texts.get(i, "") + choice["text"]
        tokens.setdefault(i, []).extend(choice["logprobs"]["tokens"])
        lps.setdefault(i, []).extend(choice["logprobs"]["token_logprobs"])
        if choice["finish_reason"] is not None:
            assert i not in finish
            finish[i] = choice["finish_reason"]
    for choice in plain["choices"]:
        i = choice["index"]
        assert texts[i] == choice["text"]
        assert tokens[i] == choice["logprobs"]["tokens"]
        # The same tokens; their log-probs to float rounding: the two requests' rows may share a step with
        # different batch sizes, and a CPU GEMM's last bits depend on the batch's shape.
        assert lps[i] == pytest.approx(choice["logprobs"]["token_logprobs"], rel=1e-5, abs=1e-6)
        assert finish[i] == choice["finish_reason"]


def test_stream_without_usage_option_has_no_usage_chunk(server):
    chunks = _stream(server, dict(prompt=PROMPT, max_tokens=3, temperature=0))
    assert all(c["choices"] for c in chunks) and all("usage" not in c for c in chunks)
    cont = _stream(server, dict(prompt=PROMPT, max_tokens=3, temperature=0, ignore_eos=True,
                                stream_options={"continuous_usage_stats": True}))
    assert cont[-1]["usage"]["completion_tokens"] == 3


def test_stream_echo_scores_prompt(server, ref):
    prompt = ref.encode(PROMPT)
    chunks = _stream(server, dict(prompt=PROMPT, echo=True, max_tokens=0, logprobs=0, memory="med"))
    plain = server.complete(prompt=PROMPT, echo=True, max_tokens=0, logprobs=0, memory="med")
    assert "".join(c["choices"][0]["text"] for c in chunks) == PROMPT
    lps = [x for c in chunks for x in c["choices"][0]["logprobs"]["token_logprobs"]]
    assert len(lps) == len(prompt) and lps[0] is None
    assert lps == plain["choices"][0]["logprobs"]["token_logprobs"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


# -- speculative mixing ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def spec_server(zoo):
    config = ServerConfig(
        model=ModelConfig(str(zoo.base)),
        engine=EngineConfig(max_num_seqs=16, speculative_tokens=3, speculative_adaptive=False),
        memories=(MemorySpec("med", str(zoo.mem_llama)),),
        served_model_name="tiny-base",
    )
    with InProcessServer(config) as s:
        yield s


def test_speculative_greedy_matches_the_reference_and_opting_out(spec_server, ref):
    """Through HTTP with --speculative-tokens: greedy tokens and log-probs equal the reference mixture, with
    and without `"speculative": false`; a stream carries the same tokens, some chunks several at once."""
    prompt = ref.encode(PROMPT)
    body = dict(prompt=prompt, memory="med", alpha=0.9, max_tokens=10, temperature=0, ignore_eos=True,
                logprobs=2, return_tokens_as_token_ids=True)
    expected, ref_lps = greedy_reference(ref.base, ref.med, prompt, 0.9, ref.vocab, 10)
    for speculative in (True, False):
        lp = spec_server.complete(**body, speculative=speculative)["choices"][0]["logprobs"]
        assert ids_of(lp["tokens"]) == expected
        for t, chosen, got in zip(expected, lp["token_logprobs"], ref_lps, strict=True):
            assert chosen == pytest.approx(float(got[t]), abs=1e-4)
    chunks = _stream(spec_server, {**body, "stream_options": {"include_usage": True}})
    *deltas, usage = chunks
    per_chunk = [ids_of(c["choices"][0]["logprobs"]["tokens"]) for c in deltas]
    assert [t for ids in per_chunk for t in ids] == expected and usage["usage"]["completion_tokens"] == 10
    assert max(map(len, per_chunk)) > 1  # a round emitted several tokens in one chunk
    assert all(len(c["choices"][0]["logprobs"]["token_logprobs"]) == len(ids)
               for c, ids in zip(deltas, per_chunk, strict=True))


def test_speculative_field_must_be_a_boolean(spec_server):
    for value in ("no", 0, None, [True]):
        r = spec_server.post("/v1/completions", {"prompt": PROMPT, "memory": "med", "speculative": value})
        err = assert_error(r, 400)
        assert "speculative" in err["message"] or err["param"] == "speculative", err
    # without a memory: ignored
    assert spec_server.complete(prompt=PROMPT, max_tokens=2, speculative=False)["choices"]


# -- perplexity -----------------------------------------------------------------------------------

DOCS = ["The court held that the statute applies to the contract.", "Once upon a time there was a house."]


def _ref_nll(ref, memory, text, alpha):
    ids = ref.encode(text)
    lp = next_token_logprobs(ref.base, memory, ids, alpha, ref.vocab)  # [T, V]
    return -sum(float(lp[t - 1, ids[t]]) for t in range(1, len(ids))), len(ids) - 1


def test_perplexity_matches_reference_and_echo(server, ref):
    r = server.post("/v1/perplexity", {"input": DOCS, "memory": "med", "alpha": [0.25, 0.75]})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "perplexity" and out["memory"] == "med" and out["alpha"] == [0.25, 0.75]
    assert out["context_length"] == 512 and out["stride"] == 256
    totals = {"base": [0.0, 0], 0.25: [0.0, 0], 0.75: [0.0, 0], "mem": [0.0, 0]}
    for doc, text in zip(out["data"], DOCS, strict=True):
        for key, memory, alpha in (("base", None, 0.0), (0.25, ref.med, 0.25), (0.75, ref.med, 0.75),
                                   ("mem", ref.med, 1.0)):
            nll, n = _ref_nll(ref, memory, text, alpha)
            totals[key][0] += nll
            totals[key][1] += n
        base_nll, n = _ref_nll(ref, None, text, 0.0)
        assert doc["num_tokens"] == n
        assert doc["base_perplexity"] == pytest.approx(math.exp(base_nll / n), rel=1e-4)
        mem_nll, _ = _ref_nll(ref, ref.med, text, 1.0)
        assert doc["memory_perplexity"] == pytest.approx(math.exp(mem_nll / n), rel=1e-4)
        assert [a["alpha"] for a in doc["alphas"]] == [0.25, 0.75]
        for entry in doc["alphas"]:
            nll, _ = _ref_nll(ref, ref.med, text, entry["alpha"])
            assert entry["nll"] == pytest.approx(nll / n, rel=1e-4)
            assert entry["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-4)
        assert doc["perplexity"] == doc["alphas"][0]["perplexity"]
        # The same number from echo log-probs, the way evaluation harnesses compute it.
        echo = server.complete(prompt=text, echo=True, max_tokens=0, logprobs=0, memory="med", alpha=0.25)
        lps = echo["choices"][0]["logprobs"]["token_logprobs"]
        assert lps[0] is None
        assert math.exp(-sum(lps[1:]) / len(lps[1:])) == pytest.approx(doc["perplexity"], rel=1e-4)
    overall = out["overall"]
    assert overall["num_tokens"] == totals["base"][1]
    assert overall["base_perplexity"] == pytest.approx(math.exp(totals["base"][0] / totals["base"][1]),
                                                       rel=1e-4)
    assert overall["alphas"][1]["perplexity"] == pytest.approx(math.exp(totals[0.75][0] / totals[0.75][1]),
                                                               rel=1e-4)
    assert overall["memory_perplexity"] == pytest.approx(math.exp(totals["mem"][0] / totals["mem"][1]),
                                                         rel=1e-4)
    assert out["usage"]["prompt_tokens"] == sum(len(ref.encode(t)) for t in DOCS)


def test_perplexity_single_alpha_default_alpha_and_base_only(server, ref):
    single = server.post("/v1/perplexity", {"input": DOCS[0], "model": "med"}).json()
    assert single["alpha"] == 0.6 and single["data"][0]["alphas"] is None
    nll, n = _ref_nll(ref, ref.med, DOCS[0], 0.6)
    assert single["data"][0]["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-4)
    base = server.post("/v1/perplexity", {"input": ref.encode(DOCS[0])}).json()
    assert base["memory"] is None and base["alpha"] is None
    doc = base["data"][0]
    assert doc["perplexity"] == doc["base_perplexity"] == pytest.approx(single["data"][0]["base_perplexity"])
    assert doc["memory_perplexity"] is None


def test_perplexity_windows_are_configurable(server, ref):
    text = " ".join(DOCS * 4)
    n = len(ref.encode(text)) - 1
    out = server.post("/v1/perplexity", {"input": text, "context_length": 16, "stride": 8}).json()
    assert (out["context_length"], out["stride"]) == (16, 8)
    assert out["data"][0]["num_tokens"] == n
    whole = server.post("/v1/perplexity", {"input": text}).json()
    # Shorter windows see less context: a different (here: any) value, same number of scored tokens.
    assert whole["data"][0]["num_tokens"] == n
    assert whole["data"][0]["base_perplexity"] != out["data"][0]["base_perplexity"]


# -- concurrency and disconnects ---------------------------------------------------------------------


def test_concurrent_requests_give_the_same_answers_as_alone(server):
    bodies = [
        dict(prompt=PROMPT, max_tokens=8, temperature=0, ignore_eos=True, memory=m, alpha=a)
        for m, a in (("med", 0.5), ("law", 0.9), (None, None), ("med", 0.1))
    ]
    alone = [server.complete(**{k: v for k, v in b.items() if v is not None}) for b in bodies]

    async def together():
        return await asyncio.gather(
            *(server.client.post("/v1/completions", json={k: v for k, v in b.items() if v is not None})
              for b in bodies)
        )

    for a, r in zip(alone, server.call(together), strict=True):
        assert r.status_code == 200
        assert r.json()["choices"][0]["text"] == a["choices"][0]["text"]


async def _raw_request(app, body: bytes, disconnect: asyncio.Event, sent: list):
    """Drive the ASGI app directly so that the client can vanish mid-request."""
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        if messages:
            return messages.pop(0)
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
        "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json"),
                                                           (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 1), "server": ("memdec.test", 80), "state": {},
    }
    await app(scope, receive, send)


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_aborts_the_request_in_the_engine(server, stream):
    import json

    engine = server.serving.engine
    aborted: list[str] = []
    real_abort = engine.abort
    engine.abort = lambda rid: (aborted.append(rid), real_abort(rid))[1]  # observe, then do the real thing
    try:
        body = json.dumps({"prompt": PROMPT, "max_tokens": 400, "ignore_eos": True, "n": 2, "memory": "med",
                           "stream": stream}).encode()

        async def scenario():
            disconnect = asyncio.Event()
            sent: list = []
            task = asyncio.ensure_future(_raw_request(server.app, body, disconnect, sent))
            deadline = time.monotonic() + 30
            # wait until generation is under way (streaming: the first chunk went out)
            while time.monotonic() < deadline:
                if engine.num_running == 2 and (not stream or any(m.get("body") for m in sent)):
                    break
                await asyncio.sleep(0.01)
            disconnect.set()
            await asyncio.wait_for(task, 30)
            return sent

        sent = server.call(scenario)
        deadline = time.monotonic() + 10
        while engine.num_running + engine.num_waiting and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.num_running == 0 and engine.num_waiting == 0
        assert len(aborted) == 2 and all(rid.startswith("cmpl-") for rid in aborted)
        if stream:
            body_bytes = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
            assert b"[DONE]" not in body_bytes  # cut short, not finished
    finally:
        engine.abort = real_abort
    # the server is fine afterwards
    assert server.complete(prompt=PROMPT, max_tokens=2)["usage"]["completion_tokens"] <= 2


# -- OpenAPI ---------------------------------------------------------------------------------------------


def test_openapi_documents_400s_not_422s(server):
    spec = server.get("/openapi.json").json()
    assert "422" not in str({p: {m: op["responses"].keys() for m, op in ops.items()}
                             for p, ops in spec["paths"].items()})
    completions = spec["paths"]["/v1/completions"]["post"]
    assert {"200", "400", "404", "413", "429", "503"} <= set(completions["responses"])
    assert "sliding windows" in spec["paths"]["/v1/perplexity"]["post"]["description"]
    assert "HTTPValidationError" not in spec["components"]["schemas"]
