"""The sampler on its public entry points (`sample`, `sampling_rows`, `apply_top_k_top_p`, `propose`,
`accept`): top-k / top-p boundaries, greedy and seeded rows, the uniform hash, speculative accept;
milliseconds, no model files."""

from __future__ import annotations

import pytest
import torch

from server.request import SamplingParams
from server.sampler import (
    ACCEPT,
    DRAFT,
    TOKEN,
    SamplingRows,
    accept,
    apply_top_k_top_p,
    propose,
    sample,
    sampling_rows,
    speculative_uniforms,
    uniform,
)


def _logits(probs: list[float]) -> torch.Tensor:
    return torch.tensor([probs], dtype=torch.float64).log().float()  # [1, V]


def _kept(logits: torch.Tensor, top_k: int, top_p: float) -> list[int]:
    """Token ids that survive the filter of one row."""
    out = apply_top_k_top_p(logits, torch.tensor([top_k]), torch.tensor([top_p]))
    return torch.isfinite(out[0]).nonzero().flatten().tolist()


# -- sampler: top-k and top-p boundaries ------------------------------------------------------------------


def test_top_k_keeps_exactly_the_k_best_and_zero_is_off():
    logits = _logits([0.1, 0.4, 0.05, 0.3, 0.15])
    assert _kept(logits, 1, 1.0) == [1]
    assert _kept(logits, 2, 1.0) == [1, 3]
    assert _kept(logits, 4, 1.0) == [0, 1, 3, 4]
    assert _kept(logits, 0, 1.0) == [0, 1, 2, 3, 4]
    assert _kept(logits, 99, 1.0) == [0, 1, 2, 3, 4]  # k beyond the vocabulary keeps everything


@pytest.mark.parametrize(
    ("top_p", "kept"),
    [
        (1e-9, [0]),  # the best token always stays
        (0.4999, [0]),
        (0.5001, [0, 1]),  # the second token's preceding mass (0.5) no longer reaches top_p
        (0.7499, [0, 1]),
        (0.7501, [0, 1, 2]),
        (0.8749, [0, 1, 2]),
        (0.8751, [0, 1, 2, 3]),
        (1.0, [0, 1, 2, 3]),
    ],
)
def test_top_p_drops_a_token_once_the_mass_before_it_reaches_p(top_p, kept):
    assert _kept(_logits([0.5, 0.25, 0.125, 0.125]), 0, top_p) == kept


def test_top_p_applies_to_the_top_k_renormalised_distribution():
    logits = _logits([0.4, 0.3, 0.2, 0.1])
    assert _kept(logits, 0, 0.5) == [0, 1]  # mass before token 1 is 0.4 < 0.5
    assert _kept(logits, 2, 0.5) == [0]  # within the top 2 it is 4/7 >= 0.5


def test_rows_are_filtered_independently():
    logits = torch.cat([_logits([0.5, 0.25, 0.125, 0.125])] * 3)
    out = apply_top_k_top_p(logits, torch.tensor([1, 0, 3]), torch.tensor([1.0, 0.6, 0.6]))
    assert [torch.isfinite(r).nonzero().flatten().tolist() for r in out] == [[0], [0, 1], [0, 1]]
    kept = torch.isfinite(out)
    assert torch.equal(out[kept], logits[kept])  # survivors keep their values


# -- sampler: greedy and seeded rows ----------------------------------------------------------------------


def _rows(params: list[SamplingParams], seeds: list[int]) -> SamplingRows:
    return sampling_rows(params, seeds, lambda a: torch.from_numpy(a.copy()))


def _draw(logp: torch.Tensor, params: list[SamplingParams], seeds: list[int], position: int = 7) -> list[int]:
    return sample(logp, _rows(params, seeds), torch.full((len(params),), position)).tolist()


def test_greedy_rows_take_the_argmax_whatever_the_seed():
    logp = torch.log_softmax(torch.randn(3, 50, generator=torch.Generator().manual_seed(0)), -1)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1e-6, seed=3),
              SamplingParams(temperature=0.0)]
    assert _draw(logp, params, [1, 3, 5]) == logp.argmax(-1).tolist()


def test_a_seeded_row_draws_the_same_token_alone_or_in_any_batch():
    torch.manual_seed(0)
    logp = torch.log_softmax(torch.randn(4, 64), -1)
    seeded = SamplingParams(temperature=0.9, top_k=20, top_p=0.95, seed=11)
    alone = [_draw(logp[2:3], [seeded], [11])[0] for _ in range(3)]
    others = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.3),
              SamplingParams(temperature=0.7)]
    batch = _draw(logp, [others[0], others[1], seeded, others[2]], [5, 6, 11, 8])
    assert alone == [alone[0]] * 3 and batch[2] == alone[0]
    draws = {_draw(logp[2:3], [seeded], [seed])[0] for seed in range(40)}
    assert len(draws) > 1  # the seed matters: it is not a disguised argmax
    positions = {_draw(logp[2:3], [seeded], [11], position=p)[0] for p in range(40)}
    assert len(positions) > 1  # and so does the position: each token of a request gets a fresh draw


def test_sampling_follows_the_filtered_distribution():
    """Frequencies of 20k draws (one seed each) match the top-k / temperature distribution; filtered tokens
    never appear."""
    probs = torch.tensor([0.45, 0.3, 0.15, 0.1])
    n = 20_000
    logp = probs.log().expand(n, -1)
    counts = torch.bincount(torch.tensor(_draw(logp, [SamplingParams(temperature=1.0, top_k=3)] * n,
                                               list(range(n)))), minlength=4).double() / n
    expected = torch.tensor([0.45, 0.3, 0.15, 0.0]) / 0.9
    assert counts[3] == 0
    assert torch.allclose(counts, expected.double(), atol=0.015), counts
    hot = torch.tensor(_draw(logp, [SamplingParams(temperature=2.0)] * n, list(range(n, 2 * n))))
    sharpened = probs.sqrt() / probs.sqrt().sum()  # temperature 2: p^(1/2), renormalised
    assert torch.allclose(torch.bincount(hot, minlength=4).double() / n, sharpened.double(), atol=0.015)


def test_the_uniform_hash_is_uniform():
    """The counter-based uniform that drives every draw: mean, spread and a 20-bin histogram."""
    seeds = torch.arange(50_000)
    u = uniform(seeds * 7919 + 3, torch.full_like(seeds, 5))
    assert u.min() > 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.002
    hist = torch.histc(u.float(), bins=20, min=0, max=1) / len(u)
    assert (hist - 0.05).abs().max() < 0.006


def test_random_streams_keep_plain_sampling_and_come_three_at_a_time():
    """Stream TOKEN hashes exactly as before speculative mixing existed (seeded outputs did not move: values
    from the previous implementation); `speculative_uniforms` equals `uniform` on each stream; streams
    differ."""
    seeds, counters = torch.tensor([0, 1, 12345, 2**62 + 7]), torch.tensor([0, 5, 99, 4096])
    before = [1.120240011864837e-10, 0.4239480554378408, 0.6488414915294607, 0.9850145429246431]
    assert uniform(seeds, counters).tolist() == before
    many_seeds, many_counters = torch.arange(5000) * 7919 + 3, torch.arange(5000) % 97
    three = speculative_uniforms(many_seeds, many_counters)
    for stream in (TOKEN, DRAFT, ACCEPT):
        assert torch.equal(three[stream], uniform(many_seeds, many_counters, stream))
    assert abs(torch.corrcoef(three)[0, 1:]).max() < 0.05 and abs(torch.corrcoef(three)[1, 2]) < 0.05


def _spec_rows(n: int, **params) -> SamplingRows:
    return _rows([SamplingParams(**params)] * n, list(range(n)))


def test_speculative_accept_draws_the_target_and_accepts_min_p_q():
    """20k positions, one seed each: drafts from q̃ kept with probability min(1, p̃/q̃), else the residual
    max(0, p̃ − q̃): tokens follow p̃ and the acceptance rate is Σ min(p̃, q̃) (here with temperature 0.5)."""
    n = 20_000
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    q = torch.tensor([0.1, 0.2, 0.3, 0.4])
    rows = _spec_rows(n, temperature=0.5)
    u = speculative_uniforms(rows.seed, torch.full((n,), 3))
    drafts = propose(q.log().expand(n, -1), rows, u[DRAFT])
    tokens, accepted = accept(p.log().expand(n, -1), drafts, None, rows, u)
    p_t, q_t = p.pow(2) / p.pow(2).sum(), q.pow(2) / q.pow(2).sum()  # temperature 0.5
    assert torch.allclose(torch.bincount(drafts.tokens, minlength=4).double() / n, q_t.double(), atol=0.015)
    assert torch.allclose(torch.bincount(tokens, minlength=4).double() / n, p_t.double(), atol=0.015)
    assert abs(accepted.double().mean().item() - torch.minimum(p_t, q_t).sum().item()) < 0.015
    assert torch.equal(tokens[accepted], drafts.tokens[accepted])


def test_speculative_accept_without_a_draft_is_plain_sampling_and_greedy_is_argmax():
    torch.manual_seed(0)
    logp, q_logp = torch.log_softmax(torch.randn(6, 50), -1), torch.log_softmax(torch.randn(6, 50), -1)
    params = [SamplingParams(temperature=0.8, top_p=0.9), SamplingParams(temperature=0.0)] * 3
    rows, counter = _rows(params, [3, 4, 5, 6, 7, 8]), torch.full((6,), 11)
    u = speculative_uniforms(rows.seed, counter)
    drafts = propose(q_logp, rows, u[DRAFT])
    none = torch.zeros(6, dtype=torch.bool)
    tokens, accepted = accept(logp, drafts, none, rows, u)
    # bit for bit the plain draw
    assert torch.equal(tokens, sample(logp, rows, counter)) and not accepted.any()
    tokens, accepted = accept(logp, drafts, None, rows, u)
    greedy = rows.greedy
    assert torch.equal(tokens[greedy], logp.argmax(-1)[greedy])
    assert torch.equal(accepted[greedy], (q_logp.argmax(-1) == logp.argmax(-1))[greedy])
