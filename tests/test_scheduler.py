"""The scheduler's admission rules on its public entry points (`Scheduler.add/schedule/remove/find`) with a
real page pool, and the prefix cache's block sharing and eviction; milliseconds, no model files."""

from __future__ import annotations

import pytest
import torch

from server.kv import SCRATCH_PAGE, KVGeometry, ModelKV, PagePool
from server.request import GenerationRequest, SamplingParams
from server.scheduler import Scheduler, StepKind
from server.sequence import Sequence

# -- scheduler --------------------------------------------------------------------------------------------


def _scheduler(max_num_seqs: int, budget: int, pages: int = 1000, block: int = 4, chunked: bool = True,
               caching: bool = False) -> Scheduler:
    """A scheduler over a real (tiny, CPU) page pool of `block`-token pages: one layer, one head of 8
    floats."""
    geometry = KVGeometry(1, 1, 8, torch.float32)  # 64 bytes a token
    pool = PagePool(pages, page_bytes=block * geometry.token_bytes, device=torch.device("cpu"))
    kv = ModelKV(pool, geometry, max_num_seqs, max_model_len=512, scratch_page=SCRATCH_PAGE,
                 prefix_caching=caching)
    return Scheduler(max_num_seqs, budget, pool, lambda key: kv, chunked_prefill=chunked)


def _seq(i: int, n: int, first: int = 5) -> Sequence:
    request = GenerationRequest(f"r{i}", tuple(range(first, first + n)),
                                SamplingParams(max_tokens=64, ignore_eos=True))
    return Sequence(request, (), frozenset(), 512)


def _ids(batch) -> list[str]:
    return [s.request_id for s in batch.seqs]


def _chunks(batch) -> list[tuple[str, int, int]]:
    return [(c.seq.request_id, c.start[None], c.end) for c in batch.prefill]


def _ran(sched: Scheduler, batch) -> None:
    """What the engine does after a step: decode rows append a token; chunks are cached, a last one
    samples."""
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
    # 5 + 5 + 2 = 12
    assert first.kind is StepKind.PREFILL and _chunks(first) == [("r0", 0, 5), ("r1", 0, 5), ("r2", 0, 2)]
    _ran(sched, first)
    second = sched.schedule()  # two decode tokens, then the rest of r2's prompt
    assert (second.kind is StepKind.MIXED and _ids(second) == ["r0", "r1"]
            and _chunks(second) == [("r2", 2, 5)])
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
    # r2 would leave no page for the next decode: it waits
    assert [c for c, _, _ in _chunks(first)] == ["r0", "r1"]
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
    # a kept its next token's page
    assert int(kv.host_blocks[b.slot]) == 5 and int(kv.host_blocks[a.slot]) == 3
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
    # blocks [0,4) [4,8): before token 9
    assert _chunks(first) == [("r0", 0, 10)] and int(kv.host_frozen[a.slot]) == 2
    b = _seq(1, 10)  # the same 10 tokens
    sched.add(b)
    batch = sched.schedule()
    assert _chunks(batch) == [("r1", 8, 10)]  # 8 tokens hit, 2 computed
    shared = [int(p) for p in kv.host_tables[a.slot, :2]]
    assert [int(p) for p in kv.host_tables[b.slot, :2]] == shared and all(pool.refs[p] == 2 for p in shared)
    # the last token's block is private
    assert int(kv.host_tables[b.slot, 2]) != int(kv.host_tables[a.slot, 2])
    with pytest.raises(ValueError, match="shared prefix"):
        kv.truncate(b.slot, 7)
    _ran(sched, batch)
    free_before = pool.num_free
    sched.remove([a, b])
    assert all(p in pool.cached for p in shared) and pool.num_free == pool.num_usable > free_before
    c = _seq(2, 12)  # the same first 8 tokens, then others
    sched.add(c)
    assert (_chunks(sched.schedule()) == [("r2", 8, 12)]
            and [int(p) for p in kv.host_tables[c.slot, :2]] == shared)
    sched.remove([c])
    assert (sched.prefix_stats
            and [(st.queries, st.hits) for st in sched.prefix_stats] == [(10, 0), (10, 8), (12, 8)])
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
