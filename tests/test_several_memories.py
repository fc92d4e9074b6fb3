"""Several memories in one request: p = Σ αᵢ·pᵢ + (1 − Σ αᵢ)·p_base, each memory's logits divided by its own
temperature. Every step's mixed distribution is checked against that formula over full no-cache forwards of
every model (computed here, independently of the engine's grouping), in batches that mix single-, multi- and
no-memory rows; plain, mixed (chunked-prefill) and speculative steps, echo, perplexity and the HTTP API."""

from __future__ import annotations

import math

import pytest
import torch

from memories.mixing import Mixture, Term, sweep
from server.config import EngineConfig
from server.engine import Engine
from server.errors import InvalidRequestError
from server.request import GenerationRequest, PerplexityRequest, SamplingParams
from server.validation import mixture_errors
from tests.engine_helpers import Recorder, assert_clean, dense_logp, logprobs_of, prompt, run, tokens_of

# rid, text, [(memory, alpha, temperature)], tokens
ROWS = [
    ("one", "The patient was given a dose", [("med", 0.6, 1.0)], 9),
    ("two", "The court held that the patient", [("med", 0.3, 0.5), ("law", 0.5, 1.7)], 10),
    ("all", "inflation", [("law", 0.2, 1.0), ("fin", 0.3, 1.0), ("med", 0.5, 2.0)], 8),  # Σα = 1: no base
    ("none", "Once upon a time", [], 7),
    ("pair", "The statute", [("fin", 0.25, 1.0), ("law", 0.25, 1.0)], 11),
]


@torch.no_grad()
def reference(base, registry, context: list[int], mixture) -> torch.Tensor:
    """The formula in probability space (float64), from one full forward of each model over the whole
    context."""
    vocab = base.vocab_size
    ids = torch.tensor([context])
    p = (torch.softmax(base.model(ids).logits[0, -1, :vocab].double(), -1)
         * (1.0 - sum(a for _, a, _ in mixture)))
    for name, alpha, temperature in mixture:
        logits = registry.loaded(name).model(ids).logits[0, -1, :vocab].double()
        p = p + alpha * torch.softmax(logits / temperature, -1)
    return torch.log(p).float()


def request(base, rid, text, mixture, n, logprobs, **kw) -> GenerationRequest:
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=logprobs, **kw)
    if len(mixture) == 1:
        (name, alpha, temperature), = mixture
        return GenerationRequest(rid, prompt(base, text), params, Mixture.one(name, alpha, temperature))
    return GenerationRequest(rid, prompt(base, text), params, Mixture(tuple(Term(*t) for t in mixture)))


def worst(out, reqs, setup) -> float:
    base, registry = setup
    vocab = base.vocab_size
    err = 0.0
    for rid, _, mixture, n in ROWS:
        r = reqs[rid]
        context = list(r.prompt_token_ids)
        lps = logprobs_of(out[rid])
        assert len(lps) == n, rid
        for lp in lps:
            got = dense_logp(lp, vocab)
            ref = reference(base, registry, context, mixture)
            finite = torch.isfinite(ref)
            assert torch.equal(finite, torch.isfinite(got)), rid
            err = max(err, (got[finite] - ref[finite]).abs().max().item())
            assert lp.token_id == int(ref.argmax()), rid  # greedy: the mixture's best token
            context.append(lp.token_id)
    return err


def all_requests(base):
    return {rid: request(base, rid, text, mixture, n, base.vocab_size) for rid, text, mixture, n in ROWS}


@pytest.mark.parametrize("config", [
    EngineConfig(block_size=4),
    # Rows join mid-decode and prompts are chunked: mixed steps (decode rows and prompt chunks in one
    # forward).
    EngineConfig(block_size=4, max_num_batched_tokens=8, enable_chunked_prefill=True),
    # A speculating engine: the single-memory row may draft; the multi-memory rows decode plainly in its
    # rounds.
    EngineConfig(block_size=4, speculative_tokens=3),
], ids=["plain", "chunked", "speculative"])  # fmt: skip  # a table: one row per case
def test_every_step_equals_the_formula_in_a_mixed_batch(setup, config):
    base, registry = setup
    reqs = all_requests(base)
    engine = Engine(*setup, config)
    first, later = list(reqs.values())[:3], list(reqs.values())[3:]
    out = run(engine, first, join={2: later})
    assert worst(out, reqs, setup) <= 1e-4
    assert_clean(engine)
    for name in ("med", "law", "fin"):  # every memory a request held is released
        assert registry.users(name) == 0


def test_a_multi_memory_row_never_drafts(setup):
    base, _ = setup
    engine = Engine(*setup, EngineConfig(block_size=4, speculative_tokens=3))
    seq = engine.add_request(request(base, "x", "The court", ROWS[1][2], 4, None))
    assert (not seq.speculative and seq.memory_names == ("med", "law")
            and seq.model_keys == (None, "med", "law"))
    assert math.isclose(seq.base_weight, 0.2)
    while engine.has_unfinished():
        engine.step()
    assert_clean(engine)


def test_echo_follows_the_mixture(setup):
    base, registry = setup
    mixture = ROWS[1][2]
    r = request(base, "echo", "The court held that the patient", mixture, 0, None, prompt_logprobs=3)
    out = run(Engine(*setup, EngineConfig(block_size=4)), [r])
    lps = out["echo"][0].prompt_logprobs
    ids = list(r.prompt_token_ids)
    assert lps[0] is None
    for t in range(1, len(ids)):
        ref = reference(base, registry, ids[:t], mixture)
        assert abs(lps[t].logprob - ref[ids[t]].item()) <= 1e-4
        assert [i for i, _ in lps[t].top] == ref.topk(3).indices.tolist()


def test_alpha_zero_memories_are_not_run_and_tokens_match_the_rest(setup):
    """A memory at α = 0 in a list contributes nothing: it is not acquired, and the tokens equal the request
    without it (here, one memory: the single-memory path)."""
    base, registry = setup
    engine = Engine(*setup, EngineConfig(block_size=4))
    multi = request(base, "m", "The patient", [("med", 0.6, 1.0), ("law", 0.0, 1.0)], 8, None)
    seq = engine.add_request(multi)
    assert seq.memory_names == ("med",)
    engine.abort_request("m")
    assert registry.users("law") == 0 and registry.users("med") == 0
    out = run(engine, [multi, request(base, "s", "The patient", [("med", 0.6, 1.0)], 8, None)])
    assert tokens_of(out["m"]) == tokens_of(out["s"])


def test_engine_refuses_bad_mixtures(setup):
    base, _ = setup
    engine = Engine(*setup, EngineConfig(block_size=4))
    ids = prompt(base, "The court")
    for memories, alphas, param in [
        (("med", "law"), (0.7, 0.4), "alpha"),  # Σα > 1
        (("med", "med"), (0.3, 0.3), "memory"),
    ]:
        # a mixture is refused where it is built
        with pytest.raises(InvalidRequestError) as exc, mixture_errors():
            engine.add_request(GenerationRequest("x", ids, SamplingParams(max_tokens=2),
                                                 Mixture.of(memories, alphas, (1.0, 1.0))))
        assert exc.value.param == param
    assert_clean(engine)


def test_a_failing_memory_fails_only_its_rows(setup, monkeypatch):
    base, _ = setup
    engine = Engine(*setup, EngineConfig(block_size=4))
    real = engine.runner._prefill_model

    def failing(key, chunks, rows):
        if key == "law":
            raise RuntimeError("law is broken")
        return real(key, chunks, rows)

    monkeypatch.setattr(engine.runner, "_prefill_model", failing)
    reqs = [
        request(base, "two", "The court", [("med", 0.3, 1.0), ("law", 0.3, 1.0)], 4, None),
        request(base, "med", "The court", [("med", 0.3, 1.0)], 4, None),
    ]
    out = run(engine, reqs)
    assert out["two"][-1].error and "law is broken" in out["two"][-1].error
    assert out["med"][-1].error is None and len(tokens_of(out["med"])) == 4
    assert_clean(engine)


@torch.no_grad()
def test_perplexity_of_two_memories_equals_the_formula(setup):
    base, registry = setup
    ids = prompt(base, "The court held that the patient was given a dose of the statute on inflation.")
    mixture = [("med", 0.3, 0.5), ("law", 0.45, 1.5)]
    engine = Engine(*setup, EngineConfig(block_size=4))
    job = engine.add_perplexity(PerplexityRequest(
        "p", (ids,), (Mixture.of(("med", "law"), (0.3, 0.45), (0.5, 1.5)),), token_logprobs=0,
    ))
    while not job.done or engine.scheduler.jobs:
        result = engine.step()
        if result.jobs:
            break
    (done,) = result.jobs
    assert done.error is None
    doc = done.result.documents[0]
    # The reference: one full forward of each model over the document, mixed in probability space.
    t = torch.tensor([ids])
    vocab = base.vocab_size
    p = torch.softmax(base.model(t).logits[0, :-1, :vocab].double(), -1) * (1 - 0.75)
    for name, alpha, temperature in mixture:
        p = p + alpha * torch.softmax(
            registry.loaded(name).model(t).logits[0, :-1, :vocab].double() / temperature, -1
        )
    per_token = torch.log(p.gather(-1, t[0, 1:, None]).squeeze(-1))
    assert abs(doc.mixed[0].mean_nll - (-per_token.mean().item())) <= 1e-4
    assert doc.memory_alone is None and len(doc.mixed) == 1
    assert max(abs(a - b) for a, b in zip(doc.tokens.mixed, per_token.tolist(), strict=True)) <= 1e-4
    for name in ("med", "law"):
        assert registry.users(name) == 0


def test_api_several_memories(med_law_server, ref):
    """Completions, chat and perplexity accept a memory list; the response echoes it; echo log-probs follow
    the mixture (checked against the HF reference models)."""
    text = "The court held that"
    body = {"prompt": text, "memory": ["med", "law"], "alpha": [0.3, 0.4], "max_tokens": 0, "echo": True,
            "logprobs": 0, "memory_temperature": [1.0, 1.0]}
    r = med_law_server.post("/v1/completions", body)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["memory"] == ["med", "law"] and data["alpha"] == [0.3, 0.4]
    ids = ref.encode(text)
    t = torch.tensor([ids])
    with torch.no_grad():
        p = 0.3 * torch.softmax(ref.med(t).logits[0, :-1, : ref.vocab].double(), -1)
        p += 0.4 * torch.softmax(ref.law(t).logits[0, :-1, : ref.vocab].double(), -1)
        p += 0.3 * torch.softmax(ref.base(t).logits[0, :-1, : ref.vocab].double(), -1)
    want = torch.log(p.gather(-1, t[0, 1:, None]).squeeze(-1)).tolist()
    got = data["choices"][0]["logprobs"]["token_logprobs"][1:]
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= 1e-4
    chat = med_law_server.post("/v1/chat/completions",
                               {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                                "memory": ["law", "med"], "alpha": [0.5, 0.5]})
    assert chat.status_code in (200, 400), chat.text  # 400 only when the base has no chat template
    if chat.status_code == 200:
        assert chat.json()["memory"] == ["law", "med"]
    ppl = med_law_server.post("/v1/perplexity",
                              {"input": text, "memory": ["med", "law"], "alpha": [0.3, 0.4]})
    assert ppl.status_code == 200, ppl.text
    pj = ppl.json()
    assert (pj["memory"] == ["med", "law"] and pj["alpha"] == [0.3, 0.4]
            and pj["overall"]["memory_nll"] is None)
    assert abs(pj["overall"]["nll"] - (-sum(want) / len(want))) <= 1e-4


def test_preemption_keeps_the_mixture(setup):
    """With pages for barely a few rows, multi-memory rows are preempted (pages freed in every model's cache)
    and recomputed; every step is still the formula."""
    base, _ = setup
    reqs = all_requests(base)
    count = Recorder()
    engine = Engine(*setup, EngineConfig(block_size=2, num_gpu_blocks_override=50), observer=count)
    out = run(engine, list(reqs.values()))
    assert count.preemptions > 0
    assert worst(out, reqs, setup) <= 1e-4
    assert_clean(engine)


def test_prefix_cache_serves_every_memory_of_a_repeated_request(setup):
    base, _ = setup
    count = Recorder()
    engine = Engine(*setup, EngineConfig(block_size=4), observer=count)
    first = run(engine, list(all_requests(base).values()))
    count.hits.clear()
    reqs = all_requests(base)
    again = run(engine, list(reqs.values()))
    assert count.hits.get("memory", 0) > 0 and count.hits.get("base", 0) > 0
    assert worst(again, reqs, setup) <= 1e-4
    assert {r: tokens_of(o) for r, o in first.items()} == {r: tokens_of(o) for r, o in again.items()}
    assert_clean(engine)


def test_sampled_multi_memory_rows_draw_the_same_alone_or_beside_speculating_rows(setup):
    """A seeded, sampled row with several memories draws from its own seed and position only: the same tokens
    in a plain engine alone as in a speculating engine beside a row whose memory drafts."""
    base, _ = setup

    def sampled(rid, mixture, text):
        params = SamplingParams(max_tokens=12, temperature=1.0, seed=7, ignore_eos=True)
        return GenerationRequest(rid, prompt(base, text), params, Mixture(tuple(Term(*t) for t in mixture)))

    mixture = ROWS[1][2]
    alone = run(Engine(*setup, EngineConfig(block_size=4)), [sampled("x", mixture, "The court")])
    drafting = GenerationRequest("d", prompt(base, "The patient"),
                                 SamplingParams(max_tokens=12, temperature=1.0, seed=3, ignore_eos=True),
                                 Mixture.one("med", 0.6))
    crowd = run(Engine(*setup, EngineConfig(block_size=4, speculative_tokens=3)),
                [drafting, sampled("x", mixture, "The court")])
    assert tokens_of(alone["x"]) == tokens_of(crowd["x"])


def _score(engine, request):
    job = engine.add_perplexity(request)
    while True:
        result = engine.step()
        if result.jobs:
            (done,) = result.jobs
            assert done.error is None and job.done
            return done.result.documents[0]


def test_memories_scored_separately_equal_one_job_per_memory(setup):
    """What `"memory": "auto"` compares: each memory's own mixture at its own α and temperature, from one
    job."""
    base, _ = setup
    ids = prompt(base, "The court held that the patient was given a dose of the statute on inflation.")
    engine = Engine(*setup, EngineConfig(block_size=4))
    together = _score(engine, PerplexityRequest("s", (ids,),
                                                (Mixture.one("med", 0.6, 0.5), Mixture.one("law", 0.4, 1.5))))
    assert len(together.mixed) == 2
    for i, (name, alpha, temperature) in enumerate((("med", 0.6, 0.5), ("law", 0.4, 1.5))):
        alone = _score(engine, PerplexityRequest(f"a{i}", (ids,), sweep(name, (alpha,), temperature)))
        assert abs(together.mixed[i].nll - alone.mixed[0].nll) <= 1e-4
        assert abs(together.base.nll - alone.base.nll) <= 1e-4


def test_a_memory_failing_in_perplexity_fails_only_that_job(setup, monkeypatch):
    """A memory whose forward raises while scoring fails the job that uses it, with the memory's message;
    a generation beside it and the next job on another memory are served, and nothing leaks."""
    base, registry = setup
    ids = prompt(base, "The court held that the patient was given a dose of the statute on inflation.")
    engine = Engine(*setup, EngineConfig(block_size=4))
    law = registry.loaded("law").model

    def broken(*args, **kwargs):
        raise RuntimeError("law is broken")

    monkeypatch.setattr(law, "forward", broken)
    engine.add_perplexity(PerplexityRequest("bad", (ids,), sweep("law", (0.4,), 1.0)))
    engine.add_request(request(base, "gen", "The court", [("med", 0.3, 1.0)], 4, None))
    outputs, failed_jobs = [], []
    for _ in range(200):  # bounded: a job the engine forgets to finish must fail the test, not hang it
        if not engine.has_unfinished():
            break
        result = engine.step()
        outputs += result.outputs
        failed_jobs += result.jobs
    (done,) = failed_jobs
    assert done.error is not None and "law is broken" in str(done.error)
    gen = [o for o in outputs if o.request_id == "gen"]
    assert gen[-1].error is None and len(tokens_of(gen)) == 4
    good = _score(engine, PerplexityRequest("good", (ids,), sweep("med", (0.4,), 1.0)))
    assert len(good.mixed) == 1
    assert_clean(engine)
