"""Memory temperature (the reference implementation's `knn_temp`): the memory's logits are divided by T before
its softmax, per row, on every path that forms mixing log-probs (plain steps, echo, speculative drafts and
verify, perplexity). Checked against full no-cache forwards and the paper's formula
`logaddexp(log_softmax(base) + log(1−λ), log_softmax(mem / T) + log(λ))`."""

from __future__ import annotations

import math

import pytest
import torch

from memories.mixing import Mixture, sweep
from server.config import EngineConfig
from server.engine import Engine
from server.errors import InvalidRequestError
from server.request import GenerationRequest, PerplexityRequest, SamplingParams
from server.validation import mixture_errors
from tests.engine_helpers import (
    assert_clean,
    chi_square,
    chi_square_critical,
    dense_logp,
    logprobs_of,
    prompt,
    run,
    tokens_of,
)

ROWS = [  # rid, text, memory, alpha, memory temperature, tokens
    ("a", "The patient was given a dose", "med", 0.6, 0.5, 14),
    ("b", "The patient", "med", 0.6, 2.0, 11),  # the same memory and α as a, another temperature: per row
    ("c", "The court held", "law", 0.4, 1.7, 9),  # padded-vocabulary Qwen2 memory
    ("d", "inflation", "fin", 0.8, 1.0, 10),  # T = 1 beside tempered rows
    ("e", "Once upon a time", None, 0.0, 1.0, 8),  # no memory
    ("f", "The statute applies", "med", 1.0, 0.7, 7),  # the memory alone, tempered
]


@torch.no_grad()
def reference(base_model, mem_model, context: list[int], alpha: float, temperature: float,
              vocab: int) -> torch.Tensor:
    """The formula, from one full forward of each model (float32)."""
    ids = torch.tensor([context])
    base = torch.log_softmax(base_model(ids).logits[0, -1, :vocab].float(), -1)
    if mem_model is None or alpha == 0.0:
        return base
    mem = torch.log_softmax(mem_model(ids).logits[0, -1, :vocab].float() / temperature, -1)
    if alpha == 1.0:
        return mem
    return torch.logaddexp(base + math.log1p(-alpha), mem + math.log(alpha))


def requests(base, logprobs: int) -> dict[str, GenerationRequest]:
    return {
        rid: GenerationRequest(rid, prompt(base, text),
                               SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True,
                                              logprobs=logprobs), Mixture.single(m, a, t))
        for rid, text, m, a, t, n in ROWS
    }


def worst(out, reqs, setup) -> float:
    base, registry = setup
    vocab = base.vocab_size
    err = 0.0
    for rid, r in reqs.items():
        mem = registry.loaded(r.mixture.names[0]).model if r.mixture.terms else None
        alpha, temperature = ((r.mixture.terms[0].alpha, r.mixture.terms[0].temperature) if r.mixture.terms
                              else (0.0, 1.0))
        context = list(r.prompt_token_ids)
        lps = logprobs_of(out[rid])
        assert len(lps) == r.params.max_tokens
        for lp in lps:
            got = dense_logp(lp, vocab)
            err = max(err, (got - reference(base.model, mem, context, alpha, temperature,
                                            vocab)).abs().max().item())
            context.append(lp.token_id)
    return err


def test_every_step_equals_the_formula_with_per_row_temperatures(setup):
    base, _ = setup
    reqs = requests(base, logprobs=base.vocab_size)
    engine = Engine(*setup, EngineConfig(block_size=4))
    out = run(engine, list(reqs.values()))
    assert worst(out, reqs, setup) <= 1e-4
    assert_clean(engine)
    # The temperature matters: the same row at T = 1 decodes differently.
    plain = {**reqs, "a": GenerationRequest("a", reqs["a"].prompt_token_ids, reqs["a"].params,
                                            Mixture.one("med", 0.6))}
    assert tokens_of(run(Engine(*setup, EngineConfig()), [plain["a"]])["a"]) != tokens_of(out["a"])


@pytest.mark.parametrize("k", [2, 5])
def test_speculative_mixing_stays_exact_with_tempered_memories(setup, k):
    """Drafts come from the tempered memory distribution q (so acceptance min(1, p/q) stays exact): greedy
    tokens equal plain decoding and every emitted distribution equals the formula."""
    base, _ = setup
    reqs = requests(base, logprobs=base.vocab_size)
    spec_engine = Engine(*setup, EngineConfig(speculative_tokens=k, speculative_adaptive=False, block_size=2))
    spec = run(spec_engine, list(reqs.values()))
    plain = run(Engine(*setup, EngineConfig(block_size=2)), list(reqs.values()))
    for rid in reqs:
        assert tokens_of(spec[rid]) == tokens_of(plain[rid]), rid
    assert worst(spec, reqs, setup) <= 1e-4
    assert any(len(o.new_token_ids) > 1 for outs in spec.values() for o in outs)  # rounds did run
    assert_clean(spec_engine)


def test_echo_logprobs_use_the_tempered_memory(setup):
    base, registry = setup
    ids = prompt(base, "The patient was given a dose of")
    r = GenerationRequest("p", ids, SamplingParams(max_tokens=0, prompt_logprobs=base.vocab_size),
                          Mixture.one("med", 0.5, 0.6))
    out = run(Engine(*setup, EngineConfig()), [r])["p"]
    echo = out[0].prompt_logprobs
    assert echo is not None and echo[0] is None
    for t in range(1, len(ids)):
        lp = echo[t]
        assert lp is not None
        ref = reference(base.model, registry.loaded("med").model, list(ids[:t]), 0.5, 0.6, base.vocab_size)
        assert abs(lp.logprob - ref[ids[t]].item()) <= 1e-4


def test_perplexity_scores_the_tempered_memory(setup):
    base, registry = setup
    vocab = base.vocab_size
    ids = prompt(base, "The patient was given a dose of the drug and the court held that")
    engine = Engine(*setup, EngineConfig())
    job = engine.add_perplexity(PerplexityRequest("x", (ids,), sweep("law", (0.3, 0.7), 1.8)))
    while engine.has_unfinished():
        engine.step()
    doc = job.result().documents[0]
    mem = registry.loaded("law").model
    with torch.no_grad():
        x = torch.tensor([ids])
        b = torch.log_softmax(base.model(x).logits[0, :-1, :vocab].float(), -1)
        m = torch.log_softmax(mem(x).logits[0, :-1, :vocab].float() / 1.8, -1)
    targets = torch.tensor(ids[1:])
    b_t, m_t = b.gather(-1, targets[:, None])[:, 0], m.gather(-1, targets[:, None])[:, 0]
    assert doc.memory_alone is not None
    assert abs(doc.memory_alone.nll + m_t.double().sum().item()) <= 1e-3
    for alpha, score in zip((0.3, 0.7), doc.mixed, strict=True):
        mixed = torch.logaddexp(b_t + math.log1p(-alpha), m_t + math.log(alpha))
        assert abs(score.nll + mixed.double().sum().item()) <= 1e-3
        assert score.num_tokens == len(ids) - 1


def test_a_bad_temperature_is_the_clients_mistake(setup):
    base, _ = setup
    engine = Engine(*setup, EngineConfig())
    for t in (0.0, -1.0, float("nan"), 1e9):
        # a mixture is refused where it is built
        with pytest.raises(InvalidRequestError) as err, mixture_errors():
            engine.add_request(GenerationRequest("z", prompt(base, "x"), SamplingParams(max_tokens=2),
                                                 Mixture.one("med", 0.5, t)))
        assert err.value.param == "memory_temperature"
    assert_clean(engine)


@torch.no_grad()
def test_sampled_speculative_tokens_follow_the_tempered_mixture(setup):
    """1,500 seeds, K = 1: the first token and the second (the round's draft, accepted or replaced by the
    residual draw) follow the exact tempered mixture by a chi-square test at significance 0.001."""
    base, registry = setup
    vocab, alpha, temp = base.vocab_size, 0.6, 0.5
    ids = prompt(base, "The patient was")
    n = 1500
    engine = Engine(*setup, EngineConfig(speculative_tokens=1, speculative_adaptive=False, max_num_seqs=256))
    reqs = [GenerationRequest(f"s{i}", ids, SamplingParams(max_tokens=3, seed=i, ignore_eos=True),
                              Mixture.one("med", alpha, temp)) for i in range(n)]
    out = run(engine, reqs)
    mem = registry.loaded("med").model

    def mixture(contexts: torch.Tensor) -> torch.Tensor:
        b = torch.log_softmax(base.model(contexts).logits[:, -1, :vocab].double(), -1)
        q = torch.log_softmax(mem(contexts).logits[:, -1, :vocab].double() / temp, -1)
        return torch.logaddexp(math.log(alpha) + q, math.log1p(-alpha) + b).exp()

    first = mixture(torch.tensor([ids]))[0]
    contexts = torch.cat([torch.tensor([ids]).expand(vocab, -1), torch.arange(vocab)[:, None]], dim=1)
    second = (first[:, None] * mixture(contexts)).sum(0)
    for position, probs in ((0, first), (1, second)):
        observed = torch.zeros(vocab, dtype=torch.float64)
        for r in reqs:
            observed[tokens_of(out[r.request_id])[position]] += 1
        stat, df = chi_square(observed, probs)
        assert df >= 3
        assert stat < chi_square_critical(df), (position, stat, df)
    assert_clean(engine)
