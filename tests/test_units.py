"""Unit tests in milliseconds, no model files: the sampler's top-k / top-p boundaries and seeded rows, the
scheduler's admission rules, the mixture formula and the sliding-window scorer with stub models (in the
style of nanochat's engine tests), and the validation rules every input goes through.

The sampler and scheduler tests use only their public entry points (`sample`, `sampling_rows`,
`apply_top_k_top_p`, `Scheduler.add/schedule/remove/find`) and a real page pool."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from memories.manifest import Manifest, ManifestError
from memories.mixing import Mixture, check_alpha, mix_logprobs, mix_scalar, sweep
from memories.models import ModelLoadError, context_length
from memories.perplexity import (
    Window,
    WindowSettingsError,
    document_logprobs,
    sliding_windows,
    window_batches,
    window_settings,
)
from server.errors import ConflictError, InvalidRequestError, MemdecError, MemoryLoadError, QueueFullError
from server.kv import SCRATCH_PAGE, KVGeometry, ModelKV, PagePool
from server.request import GenerationRequest, PerplexityRequest, SamplingParams
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
from server.scheduler import Scheduler, StepKind
from server.sequence import Sequence
from server.speculative import PRIOR_ACCEPTANCE, PRIOR_WEIGHT, SpeculationController, bucket, expected_tokens
from server.validation import (
    MAX_MEMORY_NAME,
    check_context,
    check_memory_name,
    check_memory_temperature,
    check_token_ids,
    mixture_errors,
    request_context,
    validate_generation,
    validate_perplexity,
)
from server.validation import check_alpha as server_check_alpha


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
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1e-6, seed=3), SamplingParams(temperature=0.0)]
    assert _draw(logp, params, [1, 3, 5]) == logp.argmax(-1).tolist()


def test_a_seeded_row_draws_the_same_token_alone_or_in_any_batch():
    torch.manual_seed(0)
    logp = torch.log_softmax(torch.randn(4, 64), -1)
    seeded = SamplingParams(temperature=0.9, top_k=20, top_p=0.95, seed=11)
    alone = [_draw(logp[2:3], [seeded], [11])[0] for _ in range(3)]
    others = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.3), SamplingParams(temperature=0.7)]
    batch = _draw(logp, [others[0], others[1], seeded, others[2]], [5, 6, 11, 8])
    assert alone == [alone[0]] * 3 and batch[2] == alone[0]
    draws = {_draw(logp[2:3], [seeded], [seed])[0] for seed in range(40)}
    assert len(draws) > 1  # the seed matters: it is not a disguised argmax
    positions = {_draw(logp[2:3], [seeded], [11], position=p)[0] for p in range(40)}
    assert len(positions) > 1  # and so does the position: each token of a request gets a fresh draw


def test_sampling_follows_the_filtered_distribution():
    """Frequencies of 20k draws (one seed each) match the top-k / temperature distribution; filtered tokens never appear."""
    probs = torch.tensor([0.45, 0.3, 0.15, 0.1])
    n = 20_000
    logp = probs.log().expand(n, -1)
    counts = torch.bincount(torch.tensor(_draw(logp, [SamplingParams(temperature=1.0, top_k=3)] * n, list(range(n)))),
                            minlength=4).double() / n  # fmt: skip
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
    from the previous implementation); `speculative_uniforms` equals `uniform` on each stream; streams differ."""
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
    assert torch.equal(tokens, sample(logp, rows, counter)) and not accepted.any()  # bit for bit the plain draw
    tokens, accepted = accept(logp, drafts, None, rows, u)
    greedy = rows.greedy
    assert torch.equal(tokens[greedy], logp.argmax(-1)[greedy])
    assert torch.equal(accepted[greedy], (q_logp.argmax(-1) == logp.argmax(-1))[greedy])


def test_speculation_controller_measures_every_k_then_picks_the_best_and_probes():
    ctl = SpeculationController(3)
    seen = []
    for _ in range(4):  # K first, then each smaller k, then a plain step
        k = ctl.choose(8, [0.9] * 8)
        seen.append(k)
        ctl.observe(8, k, {3: 0.040, 2: 0.032, 1: 0.024, 0: 0.010}[k])
    assert seen == [3, 2, 1, 0]
    # β = 0.9: k=3 makes 8 * 3.44 tokens in 40 ms (688/s) against 800/s plain: plain wins.
    assert ctl.choose(8, [0.9] * 8) == 0
    ctl.observe(8, 0, 0.020)  # plain got slower (its average: 12 ms, 667/s); k=3 (688/s) is not 5% better
    assert ctl.choose(8, [0.9] * 8) == 0
    ctl.observe(8, 0, 0.020)  # 13.6 ms, 588/s: now k=3 wins
    assert ctl.choose(8, [0.9] * 8) == 3
    assert ctl.choose(8, [0.1] * 8) == 0  # at β = 0.1 no k pays (1.11 tokens per row in 24 ms at best)
    assert ctl.choose(1, [0.9]) == 3  # another batch-size bucket measures on its own
    choices = [ctl.choose(8, [0.9] * 8) for _ in range(40)]
    assert {k for k in choices if k != 3} == {0, 2}  # every PROBE_EVERY-th step: a neighbour, or a plain step
    assert SpeculationController(3, adaptive=False).choose(8, [0.0] * 8) == 3
    assert expected_tokens(0.0, 4) == 1.0 and expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)
    assert [bucket(b) for b in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 16]


def test_acceptance_estimates_start_from_the_prior_and_follow_the_tests():
    ctl = SpeculationController(4)
    assert ctl.acceptance("m") == pytest.approx(PRIOR_ACCEPTANCE)
    for _ in range(50):
        ctl.observe_acceptance("m", tests=10, passed=3)
    assert ctl.acceptance("m") == pytest.approx(0.3, abs=0.01)
    assert ctl.row_acceptance("m", passed=0.0, tests=0.0) == pytest.approx(ctl.acceptance("m"))
    assert ctl.row_acceptance("m", passed=9.0, tests=10.0) == pytest.approx((9 + PRIOR_WEIGHT * 0.3) / (10 + PRIOR_WEIGHT), abs=0.01)
    assert ctl.row_acceptance("m", passed=30.0, tests=30.0) > 0.8  # enough of its own tests outweigh its memory's


# -- scheduler --------------------------------------------------------------------------------------------


def _scheduler(max_num_seqs: int, budget: int, pages: int = 1000, block: int = 4, chunked: bool = True,
               caching: bool = False) -> Scheduler:  # fmt: skip
    """A scheduler over a real (tiny, CPU) page pool of `block`-token pages: one layer, one head of 8 floats."""
    geometry = KVGeometry(1, 1, 8, torch.float32)  # 64 bytes a token
    pool = PagePool(pages, page_bytes=block * geometry.token_bytes, device=torch.device("cpu"))
    kv = ModelKV(pool, geometry, max_num_seqs, max_model_len=512, scratch_page=SCRATCH_PAGE, prefix_caching=caching)
    return Scheduler(max_num_seqs, budget, pool, lambda key: kv, chunked_prefill=chunked)


def _seq(i: int, n: int, first: int = 5) -> Sequence:
    request = GenerationRequest(f"r{i}", tuple(range(first, first + n)), SamplingParams(max_tokens=64, ignore_eos=True))
    return Sequence(request, (), frozenset(), 512)


def _ids(batch) -> list[str]:
    return [s.request_id for s in batch.seqs]


def _chunks(batch) -> list[tuple[str, int, int]]:
    return [(c.seq.request_id, c.start[None], c.end) for c in batch.prefill]


def _ran(sched: Scheduler, batch) -> None:
    """What the engine does after a step: decode rows append a token; chunks are cached, a last one samples."""
    for s in batch.seqs:
        s.token_ids.append(1)
        sched.kv_of(None).advance_host([s.slot])
    for c in batch.prefill:
        sched.prefilled(c.seq, c)
        if c.final:
            c.seq.token_ids.append(1)


def test_scheduler_decodes_first_then_fills_the_token_budget_with_prompt_chunks():
    sched = _scheduler(max_num_seqs=8, budget=12)
    for i, n in enumerate([5, 5, 5]):
        sched.add(_seq(i, n))
    first = sched.schedule()
    assert first.kind is StepKind.PREFILL and _chunks(first) == [("r0", 0, 5), ("r1", 0, 5), ("r2", 0, 2)]  # 5 + 5 + 2 = 12
    _ran(sched, first)
    second = sched.schedule()  # two decode tokens, then the rest of r2's prompt
    assert second.kind is StepKind.MIXED and _ids(second) == ["r0", "r1"] and _chunks(second) == [("r2", 2, 5)]
    _ran(sched, second)
    third = sched.schedule()
    assert third.kind is StepKind.DECODE and _ids(third) == ["r0", "r1", "r2"] and not third.prefill
    assert sched.has_unfinished()


def test_scheduler_splits_a_long_prompt_so_decodes_go_on():
    sched = _scheduler(max_num_seqs=8, budget=8)
    sched.add(_seq(0, 3))
    _ran(sched, sched.schedule())
    sched.add(_seq(1, 20))
    spans = []
    while True:
        batch = sched.schedule()
        if not batch.prefill:
            break
        assert _ids(batch) == ["r0"]  # the running stream decodes in every step of the long prompt
        spans += _chunks(batch)
        _ran(sched, batch)
    assert spans == [("r1", 0, 7), ("r1", 7, 14), ("r1", 14, 20)]  # 8 tokens a step, one of them r0's decode
    assert _ids(batch) == ["r0", "r1"]


def test_scheduler_without_chunking_runs_a_prompt_over_budget_whole_and_alone():
    sched = _scheduler(max_num_seqs=8, budget=10, chunked=False)
    sched.add(_seq(0, 3))
    sched.add(_seq(1, 50))
    first = sched.schedule()
    assert _chunks(first) == [("r0", 0, 3)]  # r1 would not fit beside it: it waits
    _ran(sched, first)
    batch = sched.schedule()
    assert batch.kind is StepKind.MIXED and _ids(batch) == ["r0"] and _chunks(batch) == [("r1", 0, 50)]


def test_scheduler_caps_running_sequences_and_frees_slots_on_remove():
    sched = _scheduler(max_num_seqs=2, budget=100)
    seqs = [_seq(i, 2) for i in range(3)]
    for s in seqs:
        sched.add(s)
    first = sched.schedule()
    assert [c for c, _, _ in _chunks(first)] == ["r0", "r1"]
    _ran(sched, first)
    decode = sched.schedule()
    assert decode.kind is StepKind.DECODE and _ids(decode) == ["r0", "r1"]  # full: #2 waits
    assert sched.find("r2") is seqs[2] and sched.find("nope") is None
    sched.remove([seqs[0]])
    assert [c for c, _, _ in _chunks(sched.schedule())] == ["r2"]
    sched.remove([seqs[1], seqs[2]])
    assert not sched.has_unfinished() and sched.find("r2") is None
    assert sched.num_free_slots == 2 and sched.pool.num_free == sched.pool.num_usable


def test_scheduler_waits_for_pages_and_preempts_the_newest_row():
    """7 usable pages of 4 tokens: two 8-token prompts fit (with room for one more token each), a third
    waits; decoding until the pages run out preempts the most recently admitted row, which then waits
    first in line with its pages back in the pool."""
    sched = _scheduler(max_num_seqs=4, budget=100, pages=8)
    seqs = [_seq(i, 8) for i in range(3)]
    for s in seqs:
        sched.add(s)
    first = sched.schedule()
    assert [c for c, _, _ in _chunks(first)] == ["r0", "r1"]  # r2 would leave no page for the next decode: it waits
    _ran(sched, first)
    preempted: list[str] = []
    for _ in range(20):
        batch = sched.schedule()
        assert batch.kind is StepKind.DECODE
        preempted += [s.request_id for s in batch.preempted]
        _ran(sched, batch)
        if preempted:
            break
    assert preempted == ["r1"] and [s.request_id for s in sched.waiting] == ["r1", "r2"]
    assert seqs[1].slot is None and seqs[1].num_preemptions == 1 and not seqs[1].wants_prompt_logprobs
    sched.remove(seqs)
    assert sched.pool.num_free == sched.pool.num_usable and sched.num_free_slots == 4


def test_spare_draft_pages_go_back_before_anyone_is_preempted():
    """A speculative row's draft pages come only from free pages above the watermark, and when another row
    needs a page and none is free they are given back first: speculation never preempts anyone."""
    sched = _scheduler(max_num_seqs=4, budget=100, pages=10)  # 9 usable pages of 4 tokens, watermark 1
    a, b = _seq(0, 8), _seq(1, 8)
    sched.add(a)
    sched.add(b)
    first = sched.schedule()
    assert [c for c, _, _ in _chunks(first)] == ["r0", "r1"]
    for c in first.prefill:
        sched.prefilled(c.seq, c)
    kv = sched.kv_of(None)
    assert sched.schedule().kind is StepKind.DECODE  # each row's 9th token: a third page each, 3 left
    assert sched.reserve_lookahead(a, 8) and int(kv.host_blocks[a.slot]) == 5  # 8 cached + 1 + 8 drafts
    assert not sched.reserve_lookahead(b, 8)  # would dip under the watermark: refused, nothing taken
    assert int(kv.host_blocks[b.slot]) == 3 and sched.pool.num_free == 1
    for _ in range(8):  # only b decodes: it takes the free page at 12 tokens, then a's spare ones at 16
        b.token_ids.append(1)
        kv.advance_host([b.slot])
        batch = sched.schedule()
        assert batch.kind is StepKind.DECODE and not batch.preempted
    assert int(kv.host_blocks[b.slot]) == 5 and int(kv.host_blocks[a.slot]) == 3  # a kept its next token's page
    sched.remove([a, b])
    assert sched.pool.num_free == sched.pool.num_usable


def test_prefix_cache_shares_full_blocks_refcounted_and_evicts_lru():
    """Two prompts with a common 9-token prefix over 4-token pages share its two full blocks (the third holds
    the prompt's last token, private); when they finish the blocks stay cached-free, count as free, are
    taken back by a third prompt, and are evicted least recently used first when pages run short."""
    sched = _scheduler(max_num_seqs=4, budget=100, pages=12, caching=True)  # 11 usable
    pool, kv = sched.pool, sched.kv_of(None)
    a = _seq(0, 10)
    sched.add(a)
    first = sched.schedule()
    _ran(sched, first)
    assert _chunks(first) == [("r0", 0, 10)] and int(kv.host_frozen[a.slot]) == 2  # blocks [0,4) [4,8): before token 9
    b = _seq(1, 10)  # the same 10 tokens
    sched.add(b)
    batch = sched.schedule()
    assert _chunks(batch) == [("r1", 8, 10)]  # 8 tokens hit, 2 computed
    shared = [int(p) for p in kv.host_tables[a.slot, :2]]
    assert [int(p) for p in kv.host_tables[b.slot, :2]] == shared and all(pool.refs[p] == 2 for p in shared)
    assert int(kv.host_tables[b.slot, 2]) != int(kv.host_tables[a.slot, 2])  # the last token's block is private
    with pytest.raises(ValueError, match="shared prefix"):
        kv.truncate(b.slot, 7)
    _ran(sched, batch)
    free_before = pool.num_free
    sched.remove([a, b])
    assert all(p in pool.cached for p in shared) and pool.num_free == pool.num_usable > free_before
    c = _seq(2, 12)  # the same first 8 tokens, then others
    sched.add(c)
    assert _chunks(sched.schedule()) == [("r2", 8, 12)] and [int(p) for p in kv.host_tables[c.slot, :2]] == shared
    sched.remove([c])
    assert sched.prefix_stats and [(st.queries, st.hits) for st in sched.prefix_stats] == [(10, 0), (10, 8), (12, 8)]
    # Fill the pool with unrelated prompts: the cached blocks are evicted (oldest first), never served stale.
    d = _seq(3, 43, first=100)  # 11 pages: every usable one
    sched.add(d)
    assert _chunks(sched.schedule()) == [("r3", 0, 43)] and not pool.cached and kv.num_cached_blocks == 0
    sched.remove([d])
    e = _seq(4, 10)
    sched.add(e)
    assert _chunks(sched.schedule()) == [("r4", 0, 10)]  # nothing left to hit
    sched.remove([e])
    assert pool.num_free == pool.num_usable


def test_prefix_cache_evicts_a_prefix_from_its_tail():
    """A finished prompt's blocks enter the LRU last block first, so eviction drops the end of a cached prefix
    and keeps its start (which every continuation needs), as vLLM does."""
    sched = _scheduler(max_num_seqs=4, budget=100, pages=12, caching=True)  # 11 usable pages of 4 tokens
    a = _seq(0, 13)  # blocks [0,4) [4,8) [8,12) published (before token 12), a fourth page for token 12
    sched.add(a)
    _ran(sched, sched.schedule())
    sched.remove([a])
    b = _seq(1, 36, first=100)  # 9 pages: the 8 never-cached ones and one evicted
    sched.add(b)
    _ran(sched, sched.schedule())
    sched.remove([b])
    c = _seq(2, 13)
    sched.add(c)
    assert _chunks(sched.schedule()) == [("r2", 8, 13)]  # a's first two blocks are still cached
    sched.remove([c])
    assert sched.pool.num_free == sched.pool.num_usable


# -- the mixture and the window scorer, with stub models ----------------------------------------------------


class _BigramLM(torch.nn.Module):
    """A stub causal LM whose next-token logits depend on the current token only: exact references."""

    def __init__(self, vocab: int, seed: int) -> None:
        super().__init__()
        table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed)) * 3
        self.table = torch.nn.Parameter(table, requires_grad=False)  # [V, V]

    def forward(self, input_ids: torch.Tensor, logits_to_keep: int = 0) -> SimpleNamespace:
        logits = self.table[input_ids]  # [B, T, V]
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


def _bigram_reference(model: _BigramLM, ids: torch.Tensor) -> torch.Tensor:
    """log p(ids[t] | ids[t-1]) for t = 1..N-1, float64."""
    logp = torch.log_softmax(model.table.double(), -1)
    return logp[ids[:-1], ids[1:]]


@pytest.mark.parametrize(("context", "stride", "max_tokens"), [(8, 4, 64), (8, 7, 8), (5, 1, 20), (64, 32, 128)])
def test_window_scorer_scores_every_token_once_in_order(context, stride, max_tokens):
    base, mem = _BigramLM(11, 0), _BigramLM(11, 1)
    ids = torch.randint(0, 11, (37,), generator=torch.Generator().manual_seed(2))
    batches = list(document_logprobs([base, mem], ids, context, stride, 11, max_tokens=max_tokens))
    got_base = torch.cat([b for b, _ in batches]).double()
    got_mem = torch.cat([m for _, m in batches]).double()
    torch.testing.assert_close(got_base, _bigram_reference(base, ids), rtol=0, atol=1e-5)
    torch.testing.assert_close(got_mem, _bigram_reference(mem, ids), rtol=0, atol=1e-5)
    assert len(batches) >= math.ceil(len(ids) / max(max_tokens, context))


def test_mixture_is_alpha_weighted_probability_with_exact_ends():
    base, mem = _BigramLM(13, 3), _BigramLM(13, 4)
    b = torch.log_softmax(base.table[5], -1)  # [V]
    m = torch.log_softmax(mem.table[5], -1)
    for alpha in (0.0, 0.3, 0.75, 1.0):
        mixed = mix_logprobs(b, m, alpha)
        expected = (alpha * m.double().exp() + (1 - alpha) * b.double().exp()).log()
        torch.testing.assert_close(mixed.double(), expected, rtol=0, atol=1e-5)
        assert abs(torch.logsumexp(mixed.double(), -1).item()) < 1e-5  # still a distribution
        assert mix_scalar(b[2].item(), m[2].item(), alpha) == pytest.approx(mixed[2].item(), abs=1e-5)
    assert torch.equal(mix_logprobs(b, m, 0.0), b) and torch.equal(mix_logprobs(b, m, 1.0), m)
    rows = mix_logprobs(torch.stack([b, b]), torch.stack([m, m]), torch.tensor([0.0, 1.0]))  # one α per row
    assert torch.equal(rows[0], b) and torch.equal(rows[1], m)


def test_window_batches_never_mix_shapes_and_respect_every_bound():
    windows = list(sliding_windows(100, 16, 4))
    for bounds in ({"max_tokens": 40}, {"max_logits": 40, "vocab_size": 5}, {"max_windows": 3}, {}):
        batches = list(window_batches(windows, **bounds))
        assert [w for b in batches for w in b] == windows
        for b in batches:
            assert len({(w.end - w.begin, w.num_scored) for w in b}) == 1
            assert len(b) * (b[0].end - b[0].begin) <= bounds.get("max_tokens", 10**9) or len(b) == 1
            assert len(b) * b[0].num_scored * bounds.get("vocab_size", 1) <= bounds.get("max_logits", 10**9) or len(b) == 1
            assert len(b) <= bounds.get("max_windows", 10**9)
    assert windows[0] == Window(0, 16, 1)


def test_window_settings_defaults_and_refusals():
    assert window_settings(4096) == (1024, 512)
    assert window_settings(300) == (300, 150)
    assert window_settings(300, 64, 10) == (64, 10)
    assert window_settings(300, 5000, clamp=True) == (300, 150)
    with pytest.raises(WindowSettingsError) as too_long:
        window_settings(300, 5000)
    assert too_long.value.param == "context_length"
    with pytest.raises(WindowSettingsError) as bad_stride:
        window_settings(300, 64, 65)
    assert bad_stride.value.param == "stride"


# -- validation rules -------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [-0.01, 1.01, float("nan"), float("inf"), True, "0.5", None])
def test_alpha_outside_the_unit_interval_is_refused_everywhere(alpha):
    with pytest.raises(ValueError, match="alpha must be in"):
        check_alpha(alpha)
    with pytest.raises(InvalidRequestError) as exc:
        server_check_alpha(alpha)
    assert exc.value.param == "alpha" and exc.value.status_code == 400
    with pytest.raises(MemoryLoadError):
        server_check_alpha(alpha, error=MemoryLoadError)


def test_alpha_ends_are_valid():
    assert check_alpha(0) == 0.0 and check_alpha(1) == 1.0 and check_alpha(0.25) == 0.25


@pytest.mark.parametrize("temperature", [0.005, 0.0, -1.0, 500.0, float("nan"), float("inf"), True])
def test_a_temperature_a_request_may_not_use_is_no_manifest_default_either(temperature):
    """One rule for manifests and requests: a memory never loads with a default temperature that would make
    every request that leaves `memory_temperature` out a 400."""
    with pytest.raises(InvalidRequestError) as exc:
        check_memory_temperature(temperature)
    assert exc.value.param == "memory_temperature"
    with pytest.raises(ManifestError, match="'temperature'"):
        Manifest(name="m", domain="d", alpha=0.5, tokenizer_fingerprint="sha256:0", temperature=temperature)


def test_temperature_ends_are_valid():
    for t in (0.01, 1, 100):
        assert check_memory_temperature(t) == float(t)
        assert Manifest(name="m", domain="d", alpha=0.5, tokenizer_fingerprint="sha256:0", temperature=t).temperature == t


def test_token_ids_context_and_memory_names():
    check_token_ids([0, 9], 10, "prompt")
    with pytest.raises(InvalidRequestError, match="token id 10 is out of vocabulary") as exc:
        check_token_ids([3, 10], 10, "input")
    assert exc.value.param == "input"
    with pytest.raises(InvalidRequestError):
        check_token_ids([-1], 10, "prompt")
    assert request_context(512, None) == 512 and request_context(512, 256) == 256 and request_context(128, 256) == 128
    check_context(10, 6, 16)
    with pytest.raises(InvalidRequestError, match="maximum context length is 16 tokens") as exc:
        check_context(10, 7, 16)
    assert exc.value.code == "context_length_exceeded" and exc.value.param == "max_tokens"
    check_memory_name("med-v1.2_b")
    for bad in ("", "a b", "a/b", "x" * (MAX_MEMORY_NAME + 1), "none", "other"):
        with pytest.raises(MemoryLoadError) as exc:
            check_memory_name(bad)
        assert exc.value.param == "name"


def test_generation_and_perplexity_requests_are_validated_whole():
    ok = GenerationRequest("r", (1, 2, 3), SamplingParams(max_tokens=5, stop_token_ids=(4,)), Mixture.one("med", 0.5))
    validate_generation(ok, vocab_size=10, max_len=8)
    cases = [  # each request is built inside the check: a mixture is refused where it is built
        (lambda: GenerationRequest("r", ()), "prompt"),
        (lambda: GenerationRequest("r", (1, 99), SamplingParams(max_tokens=1)), "prompt"),
        (lambda: GenerationRequest("r", (1,), SamplingParams(max_tokens=1), Mixture.one("med", 1.5)), "alpha"),
        (lambda: GenerationRequest("r", (1, 2, 3), SamplingParams(max_tokens=6)), "max_tokens"),
        (lambda: GenerationRequest("r", (1,), SamplingParams(max_tokens=1, logprobs=11)), "logprobs"),
        (lambda: GenerationRequest("r", (1,), SamplingParams(max_tokens=1, stop_token_ids=(10,))), "stop_token_ids"),
    ]
    for make, param in cases:
        with pytest.raises(InvalidRequestError) as exc, mixture_errors():
            validate_generation(make(), vocab_size=10, max_len=8)
        assert exc.value.param == param, make
    assert validate_perplexity(PerplexityRequest("p", ((1, 2, 3),), sweep("m", (0.0, 1.0))), 10, 4096) == (1024, 512)
    for make_job, param in [  # built inside the check, as above
        (lambda: PerplexityRequest("p", ()), "input"),
        (lambda: PerplexityRequest("p", ((1,),)), "input"),
        (lambda: PerplexityRequest("p", ((1, 12),)), "input"),
        (lambda: PerplexityRequest("p", ((1, 2),), sweep("m", (2.0,))), "alpha"),
        (lambda: PerplexityRequest("p", ((1, 2),), context_length=9000), "context_length"),
        (lambda: PerplexityRequest("p", ((1, 2),), context_length=64, stride=65), "stride"),
    ]:
        with pytest.raises(InvalidRequestError) as exc, mixture_errors():
            validate_perplexity(make_job(), 10, 4096)
        assert exc.value.param == param, make_job


def test_retry_after_is_a_field_of_every_error():
    assert MemdecError("x").retry_after is None
    assert QueueFullError("full").retry_after == 1  # the class default
    assert ConflictError("draining", retry_after=3).retry_after == 3
    assert QueueFullError("full", retry_after=7).retry_after == 7


def test_context_length_from_any_config_attribute_and_never_guessed():
    assert context_length(SimpleNamespace(n_positions=512)) == 512
    assert context_length(SimpleNamespace(max_position_embeddings=4096), cap=1000) == 1000
    assert context_length(SimpleNamespace(config=SimpleNamespace(max_sequence_length=77))) == 77
    assert context_length(SimpleNamespace(), cap=300) == 300
    with pytest.raises(ModelLoadError, match="cannot tell the model's context length"):
        context_length(SimpleNamespace(hidden_size=8))
