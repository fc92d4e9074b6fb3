"""Speculative mixing (the memory drafts, the base verifies) against independent references: greedy tokens
equal non-speculative decoding, sampled tokens follow the exact mixture (chi-square over thousands of
seeds), acceptance matches 1 − (1−α)·TV(b, q), and no page or slot is lost to rollbacks, aborts or
failures."""

from __future__ import annotations

import math

import pytest
import torch

from memories.mixing import Mixture
from server.engine import Engine
from server.request import FinishReason, GenerationRequest, SamplingParams
from server.sampler import apply_top_k_top_p
from tests.engine_helpers import (
    Recorder,
    assert_clean,
    assert_pages_owned_once,
    chi_square,
    chi_square_critical,
    engine_for,
    greedy,
    host_reads,
    logprobs_of,
    prompt,
    run,
    tokens_of,
    worst_error,
)


def spec_engine(setup, k: int, observer=None, adaptive: bool = False, **kw) -> Engine:
    return engine_for(setup, observer, speculative_tokens=k, speculative_adaptive=adaptive, **kw)


MIXED = [  # rid, text, memory, alpha, tokens, extra request fields
    ("a", "The patient was given a dose", "med", 0.6, 17, {}),
    ("b", "The court held", "law", 0.3, 9, {}),  # padded-vocabulary Qwen2 memory
    ("c", "Once upon a time there was a little house", None, 0.0, 12, {}),  # no memory: plain rows in rounds
    ("d", "inflation", "fin", 0.9, 14, {}),
    ("e", "The statute applies to the contract and", "med", 1.0, 11, {}),  # α = 1: every draft accepted
    # opted out, beside drafting rows of its memory
    ("f", "The patient", "med", 0.25, 16, {"speculative": False}),
    ("g", "rates rose", "fin", 0.0, 6, {}),  # α = 0: the base alone
    ("h", "x", "law", 0.75, 13, {}),
]


def mixed_requests(base, logprobs: int | None = None) -> dict[str, GenerationRequest]:
    return {
        rid: GenerationRequest(rid, prompt(base, text),
                               SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True,
                                              logprobs=logprobs), Mixture.single(m, a), **extra)
        for rid, text, m, a, n, extra in MIXED
    }


@pytest.mark.parametrize("k", [1, 3, 6])
def test_greedy_tokens_equal_plain_decoding_and_logprobs_equal_the_reference(setup, k):
    """A mixed batch (memories, α, opted-out and memory-less rows, rows joining later), pages of 2 tokens so
    drafts and rollbacks cross pages: tokens equal non-speculative decoding, and every emitted token's
    mixed distribution equals full no-cache forwards of both models (the caches are exact after rollbacks)."""
    base, _ = setup
    vocab = base.vocab_size
    reqs = mixed_requests(base, logprobs=vocab)
    first, later = [reqs[r] for r in "abcde"], {3: [reqs["f"], reqs["g"]], 5: [reqs["h"]]}
    counts = Recorder()
    engine = spec_engine(setup, k, counts, block_size=2)
    spec = run(engine, first, later, after_step=assert_pages_owned_once)  # draft pages too: one owner each
    plain = run(engine_for(setup, block_size=2), first, later)
    for rid in reqs:
        assert tokens_of(spec[rid]) == tokens_of(plain[rid]), rid
    specs = [(rid, reqs[rid].prompt_token_ids, m, a, n) for rid, _, m, a, n, _ in MIXED]
    assert 0.0 < worst_error(spec, specs, setup) <= 1e-4
    assert sum(counts.drafted.values()) > 0 and sum(counts.accepted.values()) > 0
    assert any(len(o.new_token_ids) > 1 for outs in spec.values() for o in outs)  # runs of several tokens
    assert_clean(engine)


def test_stop_ids_stop_strings_and_max_tokens_inside_accepted_runs(setup):
    """α = 1 accepts every draft, so stops fall inside runs: the result equals non-speculative decoding and
    the rest of the run is rolled back (the engine is clean, a later request is unaffected)."""
    base, _ = setup
    ids = prompt(base, "Once upon a time")
    free = run(engine_for(setup), [greedy("f", ids, n=24, memory="med", alpha=1.0)])["f"]
    toks, text = tokens_of(free), "".join(o.new_text for o in free)
    stop_id = next(t for t in toks[4:] if t not in toks[:4])  # its first appearance is past a round's start
    stop = next(text[i : i + 3] for i in range(len(text) // 2, len(text) - 3)
                if text[i : i + 3].strip() and text.index(text[i : i + 3]) == i)
    cases = {
        "ids": greedy("ids", ids, n=24, memory="med", alpha=1.0, stop_token_ids=(stop_id,)),
        "str": greedy("str", ids, n=24, memory="med", alpha=1.0, stop=(stop,)),
        "len": greedy("len", ids, n=7, memory="med", alpha=1.0),
    }
    engine = spec_engine(setup, 4)
    spec = run(engine, list(cases.values()))
    plain = run(engine_for(setup), list(cases.values()))
    for rid in cases:
        assert tokens_of(spec[rid]) == tokens_of(plain[rid]), rid
        assert "".join(o.new_text for o in spec[rid]) == "".join(o.new_text for o in plain[rid])
        assert (spec[rid][-1].finish_reason == plain[rid][-1].finish_reason
                and spec[rid][-1].stop_reason == plain[rid][-1].stop_reason)
        assert spec[rid][-1].num_output_tokens == len(tokens_of(spec[rid]))
    assert tokens_of(spec["ids"])[-1] == stop_id and len(tokens_of(spec["len"])) == 7
    assert "".join(o.new_text for o in spec["str"]) == text[: text.index(stop)]
    assert any(len(o.new_token_ids) > 1 for o in spec["ids"])
    assert_clean(engine)
    again = run(engine, [greedy("again", ids, n=24, memory="med", alpha=1.0)])["again"]
    assert tokens_of(again) == toks


def test_logprobs_stay_aligned_when_a_stop_string_cuts_a_run(setup):
    base, _ = setup
    ids = prompt(base, "The court held that")
    req = greedy("lp", ids, n=20, memory="law", alpha=1.0, logprobs=2)
    full = run(spec_engine(setup, 5), [req])["lp"]
    text = "".join(o.new_text for o in full)
    stop = text[len(text) // 2 :][:2]
    if not stop.strip():
        pytest.skip("no printable stop string in this text")
    cut = run(spec_engine(setup, 5),
              [greedy("lp", ids, n=20, memory="law", alpha=1.0, logprobs=2, stop=(stop,))])["lp"]
    toks, lps = tokens_of(cut), logprobs_of(cut)
    assert len(lps) == len(toks) and [lp.token_id for lp in lps] == toks
    assert lps == logprobs_of(full)[: len(lps)]


def test_seeded_requests_are_reproducible_whatever_the_rounds(setup):
    """A seeded request's tokens depend only on its seed: the same for K = 1, 2, 5, adaptive K, in a crowd,
    and after preemptions."""
    base, _ = setup
    ids = prompt(base, "The patient was given")
    req = GenerationRequest("s", ids, SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, seed=7,
                                                     ignore_eos=True), Mixture.one("med", 0.6))
    runs = [tokens_of(run(spec_engine(setup, k), [req])["s"]) for k in (1, 2, 5)]
    runs.append(tokens_of(run(spec_engine(setup, 4, adaptive=True), [req])["s"]))
    crowd = [GenerationRequest(f"n{i}", prompt(base, f"noise {i} " * (i + 1)),
                               SamplingParams(max_tokens=20, temperature=1.0), Mixture.single(m, 0.5))
             for i, m in enumerate(["med", "law", "fin", None, "med"])]
    runs.append(tokens_of(run(spec_engine(setup, 3), [*crowd[:3], req], {1: crowd[3:]})["s"]))
    counts = Recorder()
    tight = spec_engine(setup, 3, counts, block_size=2, num_gpu_blocks_override=60)
    runs.append(tokens_of(run(tight, [*crowd, req])["s"]))
    assert counts.preemptions > 0
    assert all(r == runs[0] for r in runs), runs
    other = GenerationRequest("s", ids, SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, seed=8,
                                                       ignore_eos=True), Mixture.one("med", 0.6))
    assert tokens_of(run(spec_engine(setup, 3), [other])["s"]) != runs[0]
    assert_clean(tight)


@torch.no_grad()
def exact_first_two(setup, memory: str, ids: tuple[int, ...], alpha: float, params: dict):
    """From full no-cache forwards of both models over every possible first token x: the (transformed) target
    p̃ of the first token [V], the marginal of the second [V], and the expected acceptance of the first
    round's draft, E_x Σ_y min(p̃(y|x), q̃(y|x)); plus E_x[1 − (1−α)·TV(b, q)] at the second position."""
    base, registry = setup
    vocab = base.vocab_size
    mem = registry.loaded(memory).model
    temperature, top_k, top_p = params["temperature"], params.get("top_k", 0), params.get("top_p", 1.0)

    def transformed(logp: torch.Tensor) -> torch.Tensor:
        logits = apply_top_k_top_p(logp / temperature, torch.full((len(logp),), top_k),
                                   torch.full((len(logp),), top_p))
        return logits.softmax(-1)

    def dists(contexts: torch.Tensor):
        b = torch.log_softmax(base.model(contexts).logits[:, -1, :vocab].double(), -1)
        q = torch.log_softmax(mem(contexts).logits[:, -1, :vocab].double(), -1)
        p = torch.logaddexp(math.log(alpha) + q, math.log1p(-alpha) + b)
        return b.exp(), q.exp(), transformed(p), transformed(q)

    _, _, first, _ = dists(torch.tensor([ids]))
    # every x
    contexts = torch.cat([torch.tensor([ids]).expand(vocab, -1), torch.arange(vocab)[:, None]], dim=1)
    b2, q2, p2, qt2 = dists(contexts)
    w = first[0]  # [V] probability of each first token
    second = (w[:, None] * p2).sum(0)
    acceptance = (w * torch.minimum(p2, qt2).sum(-1)).sum().item()
    formula = (w * (1 - (1 - alpha) * 0.5 * (b2 - q2).abs().sum(-1))).sum().item()
    return first[0], second, acceptance, formula


@pytest.mark.parametrize("params", [{"temperature": 1.0}, {"temperature": 0.7, "top_p": 0.8}],
                         ids=["t1", "t0.7-p0.8"])
@pytest.mark.parametrize("alpha", [0.3, 0.6, 0.9])
def test_first_two_sampled_tokens_follow_the_exact_mixture(setup, alpha, params):
    """3,000 seeds, one draft per round (K = 1, three tokens: the round drafts the second and draws the
    third): the first token (a prefill) and the second (the round's accepted draft or its residual draw)
    follow the exact mixture by a chi-square test at significance 0.001, and the drafts' acceptance is ≥ α and
    equals its exact value (and, untransformed, 1 − (1−α)·TV(b, q)) within 4 standard errors."""
    base, _ = setup
    ids = prompt(base, "The patient was")
    n = 3000
    counts = Recorder()
    engine = spec_engine(setup, 1, counts, max_num_seqs=256)
    reqs = [GenerationRequest(f"s{i}", ids, SamplingParams(max_tokens=3, seed=i, ignore_eos=True, **params),
                              Mixture.one("med", alpha)) for i in range(n)]
    out = run(engine, reqs)
    first, second, acceptance, formula = exact_first_two(setup, "med", ids, alpha, params)
    for position, probs in ((0, first), (1, second)):
        observed = torch.zeros(base.vocab_size, dtype=torch.float64)
        for r in reqs:
            observed[tokens_of(out[r.request_id])[position]] += 1
        stat, df = chi_square(observed, probs)
        assert df >= 3, "the test needs several likely tokens"
        assert stat < chi_square_critical(df), (position, stat, df)
    assert counts.drafted["med"] == n  # every request drafted its second token once
    rate = counts.accepted["med"] / n
    se = math.sqrt(acceptance * (1 - acceptance) / n)
    assert abs(rate - acceptance) < 4 * se, (rate, acceptance)
    if params == {"temperature": 1.0}:
        assert abs(acceptance - formula) < 1e-9  # Σ min(p, q) = 1 − (1−α)·TV(b, q), as derived
        assert rate >= alpha - 4 * se
    assert_clean(engine)


def test_no_slot_or_page_leaks_after_partial_acceptance_aborts_and_failures(setup):
    """Rounds with partial acceptance, an abort in the middle of generation, a memory failing in a draft step
    and the base failing in a verify: every failure stays with its rows and every page comes back."""
    base, registry = setup
    engine = spec_engine(setup, 4, block_size=2)
    reqs = [GenerationRequest(f"r{i}", prompt(base, f"request {i} about the patient"),
                              SamplingParams(max_tokens=30, temperature=1.0, seed=i, ignore_eos=True),
                              Mixture.single(m, 0.5))
            for i, m in enumerate(["med", "law", None, "fin", "med", "law"])]
    for r in reqs:
        engine.add_request(r)
    for _ in range(4):
        engine.step()
    assert engine.abort_request("r0").finish_reason is FinishReason.ABORT
    calls = {"n": 0}

    def explode(module, args, kwargs):  # the "law" memory fails in its 3rd draft step from here
        calls["n"] += 1
        if calls["n"] == 3:
            raise torch.OutOfMemoryError("simulated draft OOM")

    handle = registry.loaded("law").model.register_forward_pre_hook(explode, with_kwargs=True)
    outs: dict[str, list] = {}
    try:
        while engine.has_unfinished():
            for o in engine.step().outputs:
                outs.setdefault(o.request_id, []).append(o)
            assert_pages_owned_once(engine)
    finally:
        handle.remove()
    for rid in ("r1", "r5"):
        assert (outs[rid][-1].finish_reason is FinishReason.ERROR
                and "simulated draft OOM" in outs[rid][-1].error)
    for rid in ("r2", "r3", "r4"):
        assert outs[rid][-1].finish_reason is FinishReason.LENGTH and outs[rid][-1].num_output_tokens == 30
    assert registry.users("law") == 0 and registry.users("med") == 0
    assert_clean(engine)

    engine.add_request(greedy("running", prompt(base, "The patient"), n=12, memory="med", alpha=0.5))
    engine.add_request(greedy("plain", prompt(base, "The court"), n=12))
    engine.step()
    engine.step()

    def verify_fails(module, args, kwargs):
        ids = kwargs["input_ids"]
        if ids.shape[0] > 1 and ids.shape[1] > 1:  # a verify (a prefill is one packed row)
            raise torch.OutOfMemoryError("simulated verify OOM")

    handle = base.model.register_forward_pre_hook(verify_fails, with_kwargs=True)
    try:
        outs_ = engine.step().outputs
    finally:
        handle.remove()
    assert ({o.request_id for o in outs_} == {"running", "plain"}
            and all(o.finish_reason is FinishReason.ERROR for o in outs_))
    assert_clean(engine)


def test_one_host_read_per_speculative_round(setup, monkeypatch):
    """Drafting k tokens never reads the device: a round (drafts sampled on the device, verify, acceptance,
    several memories, log-probs, page crossings) reads it exactly once, in the engine's `fetch`."""
    base, _ = setup
    engine = spec_engine(setup, 3, block_size=2)
    reqs = [
        greedy("a", prompt(base, "The patient was"), n=60, memory="med", alpha=0.6, logprobs=3),
        GenerationRequest("b", prompt(base, "The court"),
                          SamplingParams(max_tokens=60, temperature=0.8, top_p=0.9, seed=1, ignore_eos=True),
                          Mixture.one("law", 0.4)),
        greedy("c", prompt(base, "Once upon"), n=60),
    ]
    for r in reqs:
        engine.add_request(r)
    for _ in range(3):
        engine.step()
    steps = 8
    assert host_reads(engine, steps, monkeypatch) == ["fetch"] * steps
    assert engine.scheduler.find("a").num_output_tokens > 3 + steps  # rounds emitted several tokens
