"""Prefix caching and chunked prefill against independent references (full no-cache forwards): outputs are
the same with each on and off — greedy tokens, every step's full mixed distribution (≤ 1e-4), echo
prompt log-probs, seeded samples — with several memories, speculative mixing, a memory unloaded and
reloaded while its blocks are cached, and a cache small enough to evict; after every step each page is
free, cached-free, scratch or referenced exactly its refcount times (tests/engine_helpers.py)."""

from __future__ import annotations

import pytest
import torch

from memories.mixing import Mixture
from server.config import EngineConfig
from server.engine import Engine
from server.kv import ModelKV
from server.registry import MemoryRegistry
from server.request import FinishReason, GenerationRequest, SamplingParams
from tests.engine_helpers import (
    Recorder,
    assert_clean,
    assert_pages_owned_once,
    dense_logp,
    engine_for,
    greedy,
    logprobs_of,
    prompt,
    reference_logp,
    run,
    tokens_of,
    worst_error,
)

SYSTEM = "The court held that the patient was given a dose of the statute and the contract. " * 3


def checked(engine: Engine, chunked: list[bool]):
    """After every step: the page model holds; and note whether some prompt is part-way through (chunked)."""

    def check(e: Engine) -> None:
        assert_pages_owned_once(e)
        chunked.append(any(s.in_prefill and s.num_computed > 0 for s in e.scheduler.running))

    return check


CONFIGS = {  # block_size 4: prompts span many blocks, in the base and in every memory
    "plain": {"enable_prefix_caching": False, "enable_chunked_prefill": False},
    "cache": {"enable_prefix_caching": True, "enable_chunked_prefill": False},
    "chunk": {"enable_prefix_caching": False, "max_num_batched_tokens": 16},
    "both": {"enable_prefix_caching": True, "max_num_batched_tokens": 16},
}

SHARED = [  # rid, suffix, memory, alpha, tokens, joins before step
    ("s1", "and so", "med", 0.6, 6, 0),
    ("s2", "inflation rose", "law", 0.4, 5, 2),  # the Qwen2 memory with a padded vocabulary
    ("s3", "and so", "fin", 0.7, 4, 3),
    ("s4", "x", None, 0.0, 5, 3),
    ("s5", "and so", "med", 0.6, 4, 6),  # s1's whole prompt again: all but its last token cached
    ("s6", "", "law", 0.5, 3, 7),  # the shared prefix alone
]


def shared_workload(base, vocab: int):
    reqs = {rid: greedy(rid, prompt(base, SYSTEM + suffix), n=n, memory=m, alpha=a, logprobs=vocab)
            for rid, suffix, m, a, n, _ in SHARED}
    echo = GenerationRequest("echo", prompt(base, SYSTEM + "the end"),
                             SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=3,
                                            ignore_eos=True), Mixture.one("law", 0.4))
    sampled = GenerationRequest("seeded", prompt(base, SYSTEM + "rates"),
                                SamplingParams(max_tokens=8, temperature=0.9, top_p=0.95, seed=7,
                                               ignore_eos=True), Mixture.one("med", 0.5))
    join: dict[int, list[GenerationRequest]] = {}
    for rid, *_, at in SHARED:
        join.setdefault(at, []).append(reqs[rid])
    join.setdefault(4, []).append(echo)
    join.setdefault(5, []).append(sampled)
    return reqs, join


@pytest.mark.parametrize("config", list(CONFIGS), ids=list(CONFIGS))
def test_outputs_match_the_reference_with_prefix_caching_and_chunked_prefill_on_and_off(setup, config):
    base, registry = setup
    vocab = base.vocab_size
    reqs, join = shared_workload(base, vocab)
    assert len(reqs["s1"].prompt_token_ids) > 40  # several chunks of 16 and many 4-token blocks
    lookups, chunked = Recorder(), []
    engine = engine_for(setup, lookups, block_size=4, **CONFIGS[config])
    out = run(engine, join.pop(0), join, after_step=checked(engine, chunked))
    specs = [(rid, reqs[rid].prompt_token_ids, m, a, n) for rid, _, m, a, n, _ in SHARED]
    assert worst_error(out, specs, setup) <= 1e-4
    # Echo: every prompt position's mixed log-prob, although its prefix is cached (it bypasses the cache).
    echo = out["echo"]
    ids = list(prompt(base, SYSTEM + "the end"))
    plps = echo[0].prompt_logprobs
    assert plps is not None and plps[0] is None and len(plps) == len(ids)
    law = registry.loaded("law").model
    for t in range(1, len(ids), 7):
        ref = reference_logp(base.model, law, ids[:t], 0.4, vocab)
        assert abs(plps[t].logprob - ref[ids[t]].item()) < 1e-4
    # What the configurations must show they did.
    caching, chunking = CONFIGS[config]["enable_prefix_caching"], "max_num_batched_tokens" in CONFIGS[config]
    if caching:
        assert lookups.hits["base"] >= 4 * len(SYSTEM.split()) // 2 and lookups.hits["memory"] > 0
    else:
        assert not lookups.queries
    assert any(chunked) == chunking
    assert_clean(engine)
    if config != "plain":  # the same tokens as without either, seeded samples included
        _, plain_join = shared_workload(base, vocab)
        plain = run(engine_for(setup, block_size=4, **CONFIGS["plain"]), plain_join.pop(0), plain_join)
        for rid in [*reqs, "echo", "seeded"]:
            assert tokens_of(out[rid]) == tokens_of(plain[rid]), rid


def test_speculative_mixing_with_prefix_caching_and_chunks_keeps_tokens(setup):
    """Speculative rounds over rows whose prompts share cached blocks (a rollback to a round's accepted prefix
    never touches them): greedy tokens equal plain decoding, seeded samples equal speculation without the
    cache."""
    base, _ = setup
    vocab = base.vocab_size
    reqs, _ = shared_workload(base, vocab)
    greedy_reqs = [reqs[rid] for rid in reqs]
    seeded = [GenerationRequest(f"r{i}", prompt(base, SYSTEM + f"rates {i}"),
                                SamplingParams(max_tokens=10, temperature=1.0, seed=i, ignore_eos=True),
                                Mixture.one(m, 0.6))
              for i, m in enumerate(["med", "law", "fin", "med"])]
    plain = run(engine_for(setup, block_size=4, enable_prefix_caching=False, enable_chunked_prefill=False),
                greedy_reqs)

    def spec(**kw):
        engine = engine_for(setup, block_size=4, speculative_tokens=3, speculative_adaptive=False, **kw)
        out = run(engine, greedy_reqs[:2] + seeded[:2], {2: greedy_reqs[2:] + seeded[2:]},
                  after_step=assert_pages_owned_once)
        assert_clean(engine)
        return out

    off = spec(enable_prefix_caching=False, enable_chunked_prefill=False)
    on = spec(enable_prefix_caching=True, max_num_batched_tokens=24)
    for r in greedy_reqs:
        assert (tokens_of(on[r.request_id]) == tokens_of(plain[r.request_id])
                == tokens_of(off[r.request_id])), r.request_id
    for r in seeded:
        assert tokens_of(on[r.request_id]) == tokens_of(off[r.request_id]), r.request_id


def test_unloaded_memory_blocks_are_never_served(setup, zoo):
    """A memory's cached blocks go when it is unloaded; one loaded again under the same name (another model,
    or the same one) computes its prompt anew — the base's blocks are still shared."""
    base, _ = setup
    registry = MemoryRegistry(base)
    lookups = Recorder()
    engine = Engine(base, registry, EngineConfig(block_size=4), observer=lookups)
    registry.load("med", str(zoo.mem_llama), prepare=engine.prepare_memory)
    vocab = base.vocab_size
    ids = prompt(base, SYSTEM + "and so")

    def ask(rid: str) -> tuple[int, int]:
        before = dict(lookups.hits)
        out = run(engine, [greedy(rid, ids, n=5, memory="med", alpha=0.6, logprobs=vocab)],
                  after_step=assert_pages_owned_once)
        # against the model loaded now
        assert worst_error(out, [(rid, ids, "med", 0.6, 5)], (base, registry)) <= 1e-4
        return lookups.hits["base"] - before.get("base", 0), lookups.hits["memory"] - before.get("memory", 0)

    assert ask("first") == (0, 0)
    base_hit, mem_hit = ask("again")
    assert base_hit > 0 and mem_hit > 0
    old = engine.runner.kv("med")
    assert old.num_cached_blocks > 0
    registry.unload("med")
    engine.sweep_memories()  # what the engine thread does between steps
    assert "med" not in engine.runner.models and old.num_cached_blocks == 0
    assert all(owner is not old for owner in engine.runner.pool.cached.values())
    assert_pages_owned_once(engine)
    registry.load("med", str(zoo.mem_gpt2), prepare=engine.prepare_memory)  # another model under the old name
    base_hit, mem_hit = ask("other")
    assert base_hit > 0 and mem_hit == 0
    registry.unload("med")  # no sweep in between: preparing the new one drops the old one's blocks
    registry.load("med", str(zoo.mem_gpt2), prepare=engine.prepare_memory)
    base_hit, mem_hit = ask("same")
    assert base_hit > 0 and mem_hit == 0
    assert_clean(engine)


def test_eviction_under_a_small_cache_reuses_nothing_wrong_and_leaks_nothing(setup, monkeypatch):
    """A cache of a few dozen 2-token pages, prompts sharing prefixes of different lengths, joining over time:
    cached blocks are evicted (least recently used first), rows are preempted and recomputed, and every
    distribution still equals the reference."""
    base, _ = setup
    vocab = base.vocab_size
    evicted = []
    real_forget = ModelKV.forget
    monkeypatch.setattr(ModelKV, "forget",
                        lambda self, page: (evicted.append(page), real_forget(self, page))[1])
    words = ["the", "court", "held", "that", "the", "patient", "was", "given", "a", "dose", "of", "the",
             "statute"]
    specs = []
    for i in range(10):
        text = " ".join((words * 2)[: 4 + (i * 7) % 12]) + f" case {i % 4}"
        specs.append((f"q{i}", prompt(base, text), ["med", "law", None, "fin"][i % 4], 0.5, 6, i // 2))
    reqs = {rid: greedy(rid, ids, n=n, memory=m, alpha=a, logprobs=vocab) for rid, ids, m, a, n, _ in specs}
    join: dict[int, list] = {}
    for rid, *_, at in specs:
        join.setdefault(at, []).append(reqs[rid])
    lookups = Recorder()
    engine = engine_for(setup, lookups, block_size=2, num_gpu_blocks_override=48, max_num_seqs=4,
                        max_num_batched_tokens=8)
    out = run(engine, join.pop(0), join, after_step=assert_pages_owned_once)
    assert worst_error(out, [(rid, ids, m, a, n) for rid, ids, m, a, n, _ in specs], setup) <= 1e-4
    assert evicted and lookups.hits["base"] > 0 and lookups.hits["memory"] > 0 and lookups.preemptions > 0
    assert_clean(engine)


def test_abort_and_rollback_release_shared_pages_correctly(setup):
    base, registry = setup
    vocab = base.vocab_size
    engine = engine_for(setup, block_size=4, max_num_batched_tokens=12)
    ids = prompt(base, SYSTEM + "and so")
    engine.add_request(greedy("a", ids, n=12, memory="med", alpha=0.7, logprobs=vocab))
    while engine.scheduler.find("a").in_prefill or engine.scheduler.find("a").slot is None:
        engine.step()
    engine.add_request(greedy("b", ids, n=12, memory="med", alpha=0.7, logprobs=vocab))  # shares a's blocks
    engine.add_request(greedy("gone", ids + (5, 6), n=4, memory="med", alpha=0.7))
    for _ in range(3):
        engine.step()
        assert_pages_owned_once(engine)
    # mid-prompt or decoding: refs dropped
    assert engine.abort_request("gone").finish_reason is FinishReason.ABORT
    assert_pages_owned_once(engine)
    while engine.scheduler.find("b").in_prefill:
        engine.step()
    for _ in range(4):
        engine.step()
    seq = engine.scheduler.find("b")
    # back to the prompt: the shared blocks before its last token stay untouched
    engine.rollback(seq, len(ids))
    assert_pages_owned_once(engine)
    outs: dict[str, list] = {}
    while engine.has_unfinished():
        for o in engine.step().outputs:
            outs.setdefault(o.request_id, []).append(o)
        assert_pages_owned_once(engine)
    # b's tokens after the rollback, from its prompt on: each distribution equals the reference.
    med = registry.loaded("med").model
    lps = logprobs_of(outs["b"])[-12:]
    context = list(ids)
    for lp in lps:
        got = dense_logp(lp, vocab)
        assert (got - reference_logp(base.model, med, context, 0.7, vocab)).abs().max().item() <= 1e-4
        context.append(lp.token_id)
    assert_clean(engine)


@pytest.mark.parametrize("budget", [8192, 12], ids=["whole", "chunked"])
def test_pages_are_zeroed_before_anything_reads_them(setup, budget):
    """Every byte of the arena but the scratch pages set to NaN first. After every step, each page a row's
    attention reads (its blocks up to its length; masked positions included, which some kernels multiply by
    0) holds no NaN: a prompt's pages are zeroed chunk by chunk as its length reaches them, before they are
    read. Outputs still equal the reference."""
    base, _ = setup
    vocab = base.vocab_size
    engine = engine_for(setup, block_size=4, max_num_batched_tokens=budget)
    pool = engine.runner.pool
    pool.arena.fill_(255)  # float32 0xFFFFFFFF is a NaN
    for state in engine.runner.models.values():
        pool.words[state.kv.scratch_page].zero_()
    specs = [("z1", prompt(base, SYSTEM + "and so"), "med", 0.6, 5),
             ("z2", prompt(base, SYSTEM + "x"), "law", 0.4, 5),
             ("z3", prompt(base, "The court held"), None, 0.0, 5)]
    reqs = {rid: greedy(rid, ids, n=n, memory=m, alpha=a, logprobs=vocab) for rid, ids, m, a, n in specs}

    def check(e: Engine) -> None:
        assert_pages_owned_once(e)
        for seq in e.scheduler.running:
            for key in seq.model_keys:
                kv = e.runner.kv(key)
                pages = torch.as_tensor(
                    kv.host_tables[seq.row, : kv.blocks_for(int(kv.host_lengths[seq.row]))]
                )
                assert (not kv.keys[0][pages].isnan().any()
                        and not kv.values[-1][pages].isnan().any()), (seq.request_id, key)

    out = run(engine, [reqs["z1"]], {2: [reqs["z2"], reqs["z3"]]}, after_step=check)
    assert worst_error(out, specs, setup) <= 1e-4
    assert_clean(engine)
