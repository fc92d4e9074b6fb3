"""Drive the synchronous engine and compute independent references from full no-cache forwards."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from memories.mixing import Mixture, mix_logprobs
from server.config import EngineConfig
from server.engine import Engine
from server.output import OutputProcessor
from server.request import FinishReason, GenerationRequest, RequestOutput, SamplingParams


class Recorder:
    """An engine observer that sums what the metrics are made of: speculation per memory, prefix-cache
    lookups per cache (tokens) and preemptions; every other hook is a no-op."""

    def __init__(self) -> None:
        self.drafted: dict[str, int] = {}
        self.accepted: dict[str, int] = {}
        self.queries: dict[str, int] = {}
        self.hits: dict[str, int] = {}
        self.preemptions = 0

    def on_speculation(self, memory: str, drafted: int, accepted: int) -> None:
        self.drafted[memory] = self.drafted.get(memory, 0) + drafted
        self.accepted[memory] = self.accepted.get(memory, 0) + accepted

    def on_prefix_cache(self, cache: str, queries: int, hits: int) -> None:
        self.queries[cache] = self.queries.get(cache, 0) + queries
        self.hits[cache] = self.hits.get(cache, 0) + hits

    def on_kv_cache(self, usage: float, preemptions: int) -> None:
        self.preemptions += preemptions

    def __getattr__(self, name):  # the other hooks
        return lambda *a, **k: None


def engine_for(setup, observer=None, **kw) -> Engine:
    """An engine on the `setup` fixture's base and registry with these EngineConfig fields."""
    base, registry = setup
    return Engine(base, registry, EngineConfig(**kw), observer=observer)


def run(
    engine: Engine,
    requests: list[GenerationRequest],
    join: dict[int, list[GenerationRequest]] | None = None,
    after_step: Callable[[Engine], None] | None = None,
):
    """Step the engine to completion; `join[k]` requests are added before step k. Returns outputs per id.

    Outputs go through each request's OutputProcessor, as `AsyncEngine.generate` does: they carry text,
    and a stop string ends the request in the engine. `after_step` (a check) runs after every step.
    """
    join = join or {}
    outputs: dict[str, list[RequestOutput]] = {}
    processors: dict[str, OutputProcessor] = {}

    def add(r: GenerationRequest) -> None:
        engine.add_request(r)
        processors[r.request_id] = OutputProcessor(r, engine.base.tokenizer)

    for r in requests:
        add(r)
    step = 0
    while engine.has_unfinished() or any(k >= step for k in join):
        for r in join.get(step, []):
            add(r)
        for eng_out in engine.step().outputs:
            proc = processors[eng_out.request_id]
            if proc.stopped is not None:
                continue
            out = proc.process(eng_out)
            if out is None:
                continue
            outputs.setdefault(out.request_id, []).append(out)
            if proc.stopped is not None:
                engine.abort_request(out.request_id, FinishReason.STOP)
        if after_step is not None:
            after_step(engine)
        step += 1
    return outputs


def assert_pages_owned_once(engine: Engine) -> None:
    """The refcount model of the KV arena (server/kv.py): every page is free, cached-free (no references, its
    block still published by one model), a model's scratch page, or referenced by exactly `refs[page]`
    (model, slot) table entries, all of one model."""
    pool = engine.runner.pool
    refs: dict[int, int] = {}
    owner: dict[int, object] = {}
    scratch = []
    for key, state in engine.runner.models.items():
        kv = state.kv
        scratch.append(kv.scratch_page)
        for page in kv.pages_held():
            refs[page] = refs.get(page, 0) + 1
            assert owner.setdefault(page, key) == key, f"page {page} is in two models' tables"
        for page in kv._hash_of:  # published blocks belong to this model only
            assert owner.setdefault(page, key) == key, f"page {page} is published by two models"
            assert (pool.refs[page] > 0
                    or pool.cached.get(page) is kv), f"published page {page} neither held nor cached"
    assert len(scratch) == len(set(scratch)) and not set(scratch) & set(refs), "a scratch page is held"
    for page, n in refs.items():
        assert pool.refs[page] == n, f"page {page}: {n} table entries, refcount {pool.refs[page]}"
    free = set(pool._free)
    assert len(free) == len(pool._free), "a page is free twice"
    cached = set(pool.cached)
    assert not free & cached and not (free | cached) & set(refs) and not (free | cached) & set(scratch)
    assert all(pool.refs[p] == 0 for p in free | cached)
    assert len(free) + len(cached) + len(refs) + len(scratch) == pool.num_pages, "a page leaked"
    for state in engine.runner.models.values():  # shared / published blocks lie within what a row has cached
        kv = state.kv
        assert (kv.host_frozen * kv.block_size <= kv.host_lengths).all()


def tokens_of(outs: list[RequestOutput]) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


def logprobs_of(outs: list[RequestOutput]):
    return [lp for o in outs for lp in (o.new_logprobs or ())]


def dense_logp(lp, vocab: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A position's returned log-probs (`lp.top`, asked for the whole vocabulary) as a dense [V] vector;
    tokens not returned (zero probability) are −inf."""
    out = torch.full((vocab,), float("-inf"), dtype=dtype)
    ids, vals = zip(*lp.top, strict=True)
    out[list(ids)] = torch.tensor(vals, dtype=dtype)
    return out


@torch.no_grad()
def reference_logp(base_model, mem_model, context: list[int], alpha: float, vocab: int) -> torch.Tensor:
    """Mixed next-token log-probs [V] from one full forward of each model over the whole context."""
    ids = torch.tensor([context])
    base = torch.log_softmax(base_model(ids).logits[0, -1, :vocab].float(), -1)
    if mem_model is None or alpha == 0.0:
        return base
    mem = torch.log_softmax(mem_model(ids).logits[0, -1, :vocab].float(), -1)
    return mix_logprobs(base, mem, alpha)


def prompt(base, text: str) -> tuple[int, ...]:
    return tuple(base.tokenizer(text).input_ids)


def greedy(rid, ids, n=12, memory=None, alpha=0.0, **kw):
    return GenerationRequest(rid, ids, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **kw),
                             Mixture.single(memory, alpha))


def assert_clean(engine: Engine) -> None:
    """Every page and slot is back in its pool."""
    usage = engine.cache_usage()
    assert (usage.free_pages, usage.free_slots) == (usage.usable_pages, usage.num_slots), usage


def worst_error(out, specs, setup) -> float:
    """Largest |engine − reference| over every step's full mixed distribution (requests ask
    logprobs = vocab)."""
    base, registry = setup
    vocab = base.vocab_size
    worst = 0.0
    for rid, ids, memory, alpha, n in specs:
        mem_model = registry.loaded(memory).model if memory else None
        context = list(ids)
        lps = logprobs_of(out[rid])
        assert len(lps) == n, rid
        for lp in lps:
            engine_logp = dense_logp(lp, vocab)
            ref = reference_logp(base.model, mem_model, context, alpha, vocab)
            # Where both are −inf the difference is NaN, which `max` would silently skip: compare the supports
            # exactly, the values where they are finite.
            finite = torch.isfinite(ref)
            assert torch.equal(finite, torch.isfinite(engine_logp)), rid
            worst = max(worst, (engine_logp[finite] - ref[finite]).abs().max().item())
            context.append(lp.token_id)
    return worst


def chi_square_critical(df: int, z: float = 3.09) -> float:
    """Wilson–Hilferty approximation of the chi-square quantile (z = 3.09: significance 0.001)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """(statistic, degrees of freedom) of observed token counts [V] against probabilities [V]. Tokens
    expected fewer than 5 times share one cell; nothing may be observed where the probability is 0."""
    n = counts.sum().item()
    expected = probs.double() * n
    assert counts[expected == 0].sum() == 0, "a token with probability 0 was drawn"
    big = expected >= 5
    cells_obs = [*counts[big].tolist(), counts[~big].sum().item()]
    cells_exp = [*expected[big].tolist(), expected[~big].sum().item()]
    if cells_exp[-1] < 5:  # fold a tiny remainder away
        cells_obs, cells_exp = cells_obs[:-1], cells_exp[:-1]
    stat = sum((o - e) ** 2 / e for o, e in zip(cells_obs, cells_exp, strict=True))
    return stat, len(cells_exp) - 1


def host_reads(engine: Engine, steps: int, monkeypatch) -> list[str]:
    """Run `steps` engine steps with a probe on every Python-visible way a tensor reaches the host; returns
    what read it, in order ("fetch" for the engine's one read per step, which the probe does not see into)."""
    import server.engine as engine_module

    reads: list[str] = []
    inside_fetch = [False]
    real_fetch = engine_module.fetch

    def counting_fetch(*tensors):
        reads.append("fetch")
        inside_fetch[0] = True
        try:
            return real_fetch(*tensors)
        finally:
            inside_fetch[0] = False

    def probe(name):
        real = getattr(torch.Tensor, name)

        def wrapper(self, *a, **k):
            if not inside_fetch[0]:
                reads.append(name)
            return real(self, *a, **k)

        return wrapper

    for name in ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__",
                 "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, probe(name))
    monkeypatch.setattr(engine_module, "fetch", counting_fetch)
    try:
        for _ in range(steps):
            result = engine.step()
            assert result.kind.value == "decode", result.kind
    finally:
        monkeypatch.undo()
    return reads
