"""The synchronous engine: one `step()` = schedule → run the models → mix/sample → postprocess.

It owns no thread; `AsyncEngine` drives it from one. Tests drive it directly, step by step. It works
on token ids only: text and stop strings are `server.output`'s business, off the engine thread.

A decode step makes one host synchronisation, reading what the host needs (sampled tokens, their
log-probs) in a single `fetch`. Everything else the device needs is already there: each slot's last
token (written by the sampler), KV tables and lengths (updated in place), and the batch's per-row
parameters (uploaded when the batch's membership changes, not every step).

With `speculative_tokens` K > 0 a decode step may be a speculative round instead: each memory drafts
k <= K tokens per row on the device, the base verifies them in one forward, and each row keeps its
accepted prefix plus one token (`_speculative_step`); still one `fetch`. Rows without a memory, at
α = 0, opted out or with several memories decode as usual in the same round.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from memories.mixing import Part, apply, base_weight, memory_logprobs, no_router
from memories.router import advantage_emas, routed_part
from server.config import EngineConfig
from server.context import ContextState, prompt_targets, target_logprobs
from server.errors import InvalidRequestError, NotFoundError
from server.kv import KVGeometry
from server.loader import LoadedModel
from server.perplexity import PerplexityJob
from server.registry import MemoryRegistry
from server.request import (
    EngineOutput,
    FinishReason,
    GenerationRequest,
    PerplexityRequest,
    PerplexityResult,
    TokenLogprob,
)
from server.runner import MemoryGroup, ModelRunner, RowBatch, SpecLogits, SpecPlan, StepLogits
from server.sampler import DRAFT, Drafts, accept, propose, sample, speculative_uniforms, top_logprobs
from server.scheduler import PrefillChunk, ScheduledBatch, Scheduler, StepKind
from server.sequence import MemoryUse, Sequence
from server.speculative import ROW_DECAY, SpeculationController
from server.transfer import fetch
from server.validation import mixture_errors, request_context, validate_generation, validate_perplexity

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepStats:
    is_prefill: bool
    batch_size: int
    num_tokens: int  # tokens processed by the base this step
    phases: dict[str, float]  # schedule, base_forward, memory_forward, mix_sample (seconds)


@dataclass(frozen=True)
class JobOutput:
    """A finished perplexity job: its result, or the error that ended it."""

    request_id: str
    result: PerplexityResult | None = None
    error: Exception | None = None


@dataclass(frozen=True)
class StepResult:
    kind: StepKind
    outputs: list[EngineOutput] = field(default_factory=list)
    jobs: list[JobOutput] = field(default_factory=list)
    stats: StepStats | None = None


@dataclass(frozen=True)
class CacheUsage:
    free_pages: int
    usable_pages: int
    free_slots: int
    num_slots: int


class EngineObserver(Protocol):
    def on_step(self, stats: StepStats) -> None: ...
    def on_queue(self, running: int, waiting: int) -> None: ...
    def on_request_finished(self, seq: Sequence) -> None: ...
    def on_kv_cache(self, usage: float, preemptions: int) -> None: ...
    def on_graph_capture(self, model: str | None, seconds: float) -> None: ...
    def on_speculation(self, memory: str, drafted: int, accepted: int) -> None: ...
    def on_prefix_cache(self, cache: str, queries: int, hits: int) -> None: ...


@dataclass(frozen=True)
class _Sampled:
    """What the host read back from one step."""

    tokens: np.ndarray  # [B]
    logprobs: dict[int, TokenLogprob]  # row -> the chosen token's log-prob and top alternatives
    prompt_logprobs: dict[int, tuple[TokenLogprob | None, ...]]  # echo row -> per prompt token
    accepted: np.ndarray | None = None  # [B] speculative rows: the position's acceptance test passed


@dataclass
class _SpecCounts:
    """One memory's speculation in one step: drafts made and kept, acceptance tests run and passed."""

    drafted: int = 0
    accepted: int = 0
    tests: int = 0
    passed: int = 0

    def add(self, seq: Sequence, drafted: int, emitted: int, last_passed: bool) -> None:
        """A row that drafted `drafted` tokens and emitted `emitted`: every emitted position had a test
        (the last one's may have failed), every one before it kept its draft. The row keeps its own tally."""
        passed = emitted - 1 + int(last_passed)
        self.drafted += drafted
        self.accepted += emitted - 1
        self.tests += emitted
        self.passed += passed
        seq.spec_passed = ROW_DECAY * seq.spec_passed + passed
        seq.spec_tests = ROW_DECAY * seq.spec_tests + emitted


@dataclass(frozen=True)
class _Round:
    """What the host read back from a speculative round."""

    tokens: np.ndarray  # [B, T] the token at each position (a row emits its first `emitted` ones)
    emitted: np.ndarray  # [B] accepted drafts + 1
    last_accepted: np.ndarray  # [B] the acceptance test at the row's last emitted position passed
    logprobs: dict[tuple[int, int], TokenLogprob]  # (row, position) -> log-prob and top alternatives


def _group_part(g: MemoryGroup, base_lp: torch.Tensor, mem_lp: torch.Tensor, context: torch.Tensor | None = None) -> Part:
    """One memory group's `Part` of its rows' mixture ([b, V], or [b, T, V] in a round): αᵢ·pᵢ at each row's
    fixed α, or, for `"alpha": "auto"` rows, α_t from the memory's router on the base's own log-probs `base_lp`
    [B, ...] and the memory's (one batched call for the whole group; their base weight is 1 so far), and the
    rows' context features [b, K] when the router reads them (`ContextState`)."""
    log_alpha = g.log_alpha.view(-1, *([1] * (mem_lp.dim() - 1)))  # [b, 1] or [b, 1, 1]
    rows = None if g.whole_batch else g.rows_dev
    if g.router is None:
        return Part(mem_lp, log_alpha, rows=rows)
    routed = g.routed.view_as(log_alpha) if g.routed is not None else None
    base_rows = base_lp if rows is None else base_lp.index_select(0, rows)
    return routed_part(g.router, base_rows, mem_lp, context, routed, log_alpha if routed is not None else None, rows)


class Engine:
    def __init__(
        self,
        base: LoadedModel,
        registry: MemoryRegistry,
        config: EngineConfig | None = None,
        observer: EngineObserver | None = None,
    ) -> None:
        self.base = base
        self.registry = registry
        self.config = config or EngineConfig()
        self.observer = observer
        self.max_model_len = min(base.max_model_len, self.config.max_model_len or base.max_model_len)
        self.runner = ModelRunner(base, self.config)
        self.scheduler = Scheduler(self.config.max_num_seqs, self.config.max_num_batched_tokens, self.runner.pool, self.runner.kv,
                                   chunked_prefill=self.config.enable_chunked_prefill)  # fmt: skip
        self._decode_batch: tuple[int, RowBatch] | None = None  # (scheduler version, batch)
        self._plan: tuple[tuple[int, tuple[int, ...]], SpecPlan] | None = None  # ((version, k per row), plan)
        self.context = ContextState(self.config.max_num_seqs, self.runner.device)  # routers' advantage EMAs per row
        k = self.config.speculative_tokens
        self.speculation = SpeculationController(k, self.config.speculative_adaptive) if k else None
        if observer is not None:
            observer.on_graph_capture(None, self.runner.models[None].capture_seconds)
        for info in registry.list():  # memories loaded before the engine: capture their graphs now
            self.prepare_memory(info.name, registry.loaded(info.name))

    # -- memories --------------------------------------------------------------------------------
    def prepare_memory(self, name: str, memory: LoadedModel) -> float:
        """Give a memory its KV view and decode graphs (engine thread). Returns capture seconds."""
        if self.runner.has_model(name, memory):
            return 0.0
        self.runner.remove_model(name)  # an earlier memory of the same name
        seconds = self.runner.add_model(name, memory)
        if self.observer is not None:
            self.observer.on_graph_capture(name, seconds)
        return seconds

    def sweep_memories(self) -> None:
        """Drop the runner's state (graphs, views, the model reference) of memories the registry freed."""
        in_use = {name for s in (*self.scheduler.running, *self.scheduler.waiting) for name in s.memory_names}
        in_use |= {name for job in self.scheduler.jobs for name in job.memory_names}
        for key in [k for k in self.runner.models if k is not None]:
            if key not in in_use and key not in self.registry:
                self.runner.remove_model(key)

    # -- admission -------------------------------------------------------------------------------
    def _tokens_per_page(self, memories: list[LoadedModel]) -> list[int]:
        """Tokens one KV page holds in each model a request uses."""
        sizes = [self.runner.kv(None).block_size]
        for memory in memories:
            model = memory.model  # None once the registry freed it (this runs on the event loop thread)
            if model is None:
                raise NotFoundError("the memory is not loaded", param="memory", code="memory_not_found")
            sizes.append(self.runner.pool.page_bytes // KVGeometry.of(model.config, memory.dtype).token_bytes)
        return sizes

    def validate(self, request: GenerationRequest) -> None:
        """Raise the client's mistake as a 4xx error; nothing is queued or acquired. The mixture itself was
        checked when it was built (`Mixture`): here only what it needs of the registry and the cache."""
        memory_len, memories = None, []
        for term in request.mixture.terms:
            memory_len = min(memory_len or self.max_model_len, self.registry.get(term.memory).max_model_len)  # NotFoundError when unknown
            if term in request.mixture.active:
                memories.append(self.registry.loaded(term.memory))
        validate_generation(request, self.base.vocab_size, request_context(self.max_model_len, memory_len))
        total = len(request.prompt_token_ids) + request.params.max_tokens
        pages = sum(-(-total // per_page) for per_page in self._tokens_per_page(memories))
        if pages > self.runner.pool.num_usable:
            what = "" if not memories else " and the memory" if len(memories) == 1 else f" and {len(memories)} memories"
            raise InvalidRequestError(
                f"This request needs {pages} KV cache pages ({total} tokens in the base"
                f"{what}) but the whole cache has "
                f"{self.runner.pool.num_usable}. Reduce the prompt or max_tokens, or give the server more "
                "KV memory (--gpu-memory-utilization, --num-gpu-blocks-override).",
                param="max_tokens",
                code="kv_cache_too_small",
            )

    def add_request(self, request: GenerationRequest) -> Sequence:
        self.validate(request)
        uses: list[MemoryUse] = []  # the mixture's active terms, bound: each model held until the sequence retires
        try:
            for term in request.mixture.active:
                memory = self.registry.acquire(term.memory)  # NotFoundError when unknown or retiring
                router = self.registry.router(term.memory) if term.routed else None
                if term.routed and router is None:
                    self.registry.release(term.memory)
                    with mixture_errors():
                        raise no_router(term.memory)
                uses.append(MemoryUse(term.memory, memory, term.alpha or 0.0, term.temperature, router))
                self.prepare_memory(term.memory, memory)  # normally done when it was loaded
        except Exception:
            for use in uses:
                self.registry.release(use.name)
            raise
        max_len = self.max_model_len
        for use in uses:
            max_len = request_context(max_len, use.lm.max_model_len)
        seq = Sequence(request, tuple(uses), self.base.eos_token_ids, max_len)
        self.scheduler.add(seq)
        return seq

    def add_perplexity(self, request: PerplexityRequest) -> PerplexityJob:
        held: list[str] = []
        memories = []
        try:
            max_len = self.max_model_len
            for name in request.memory_names:
                memory = self.registry.acquire(name)
                held.append(name)
                memories.append(memory)
                max_len = request_context(max_len, memory.max_model_len)
            context, stride = validate_perplexity(request, self.base.vocab_size, max_len)
            router = self.registry.router(held[0]) if request.routed else None
            if request.routed and router is None:
                with mixture_errors():
                    raise no_router(held[0])
            for name, memory in zip(held, memories, strict=True):
                self.prepare_memory(name, memory)
            job = PerplexityJob(request, self.base, memories, context, stride, router)
        except Exception:
            for name in held:
                self.registry.release(name)
            raise
        self.scheduler.add_job(job)
        return job

    def abort_request(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> EngineOutput | None:
        """End a request early: ABORT (the client left) or STOP (a stop string matched downstream)."""
        seq = self.scheduler.find(request_id)
        if seq is None:
            return None
        seq.finish(reason)
        return self._retire([seq])[0]

    def abort_job(self, request_id: str) -> None:
        for job in list(self.scheduler.jobs):
            if job.request_id == request_id:
                self._end_job(job)

    def rollback(self, seq: Sequence, num_tokens: int) -> None:
        """Forget what a running sequence generated after its first `num_tokens` tokens, in every cache.

        O(1) per model (lengths and the pages past the new end); speculative decoding rolls rejected drafts back.
        """
        if seq.slot is None or seq.is_finished:
            raise ValueError("only a running sequence can be rolled back")
        if seq.context_routed:  # its advantage EMAs hold the forgotten tokens; no caller needs to undo them (yet)
            raise ValueError("a row routed with context features cannot be rolled back")
        seq.rollback(num_tokens)
        for key in seq.model_keys:
            self.runner.kv(key).truncate(seq.row, num_tokens - 1)  # the last token is the next input, not cached
        self.runner.set_last_token(seq.row, seq.token_ids[-1])
        self.scheduler.kv_changed()

    def cache_usage(self) -> CacheUsage:
        pool = self.runner.pool
        return CacheUsage(pool.num_free, pool.num_usable, self.scheduler.num_free_slots, self.config.max_num_seqs)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # -- the step ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> StepResult:
        """Decode rows first, then prompt chunks within the token budget. A step with both (MIXED) runs them in
        one forward per model (`_mixed_step`); a step of decode rows alone runs the decode graphs (or a
        speculative round), one of prompt chunks alone a packed prefill."""
        t0, c0 = time.perf_counter(), self._step_clock()
        batch = self.scheduler.schedule()
        self._report_prefix_stats()
        if batch.kind is StepKind.IDLE:
            return StepResult(batch.kind)
        if batch.kind is StepKind.SCORE:
            if batch.preempted and self.observer is not None:  # making room for decode preempted, then it scored
                self.observer.on_kv_cache(self.runner.kv_usage, len(batch.preempted))
            return self._score(batch)
        if batch.kind is StepKind.MIXED:
            k_rows = self._lookahead(batch)
            if k_rows is None:
                outputs, stats = self._mixed_step(batch, t0, c0)
            else:  # a speculative round for the decode rows, then the prompt chunks: two forwards
                outputs, stats = self._decode_step(batch, t0, c0, k_rows)
                more, _ = self._prefill_step(batch, time.perf_counter())
                outputs += more
        elif batch.kind is StepKind.DECODE:
            outputs, stats = self._decode_step(batch, t0, c0)
        else:
            outputs, stats = self._prefill_step(batch, t0)
        return StepResult(batch.kind, outputs, stats=stats)

    def _report_prefix_stats(self) -> None:
        stats, self.scheduler.prefix_stats = self.scheduler.prefix_stats, []
        if self.observer is not None:
            for st in stats:
                self.observer.on_prefix_cache(st.cache, st.queries, st.hits)

    def _decode_step(
        self, batch: ScheduledBatch, t0: float, c0: float, k_rows: list[int] | None = None
    ) -> tuple[list[EngineOutput], StepStats | None]:
        if k_rows is None:
            k_rows = self._lookahead(batch)  # reserves draft pages: before the flush
        self.runner.flush()  # the scheduler's KV changes reach the device
        rows = self._rows(batch)
        now = time.monotonic()
        for seq in rows.seqs:
            if seq.timings.scheduled is None:
                seq.timings.scheduled = now
        t_sched = time.perf_counter() - t0
        if k_rows is not None:
            return self._speculative_step(batch, rows, k_rows, c0, t_sched)
        try:
            logits = self.runner.decode(rows)
        except Exception as exc:  # the base failed: this step's sequences fail, the engine lives on
            return self._base_failed(rows.seqs, exc), None
        t1 = time.perf_counter()
        sampled = self._mix_and_sample(rows, logits, False)  # ends with the step's one host sync
        self.runner.step_done()
        outputs = self._postprocess(rows, logits, sampled, False)
        if self.speculation is not None and rows.spec_rows:
            self.speculation.observe(len(rows.seqs), 0, self._step_clock() - c0)
        return outputs, self._observe(False, len(rows.seqs), len(rows.seqs), t_sched, logits, t1, len(batch.preempted))

    def _mixed_step(self, batch: ScheduledBatch, t0: float, c0: float) -> tuple[list[EngineOutput], StepStats | None]:
        """Decode rows and prompt chunks in one forward per model (vLLM's mixed batch): each decode row is a
        one-token segment on its cache. One forward instead of two saves a whole forward's fixed cost, which
        is what a running stream's inter-token latency pays while a long prompt is admitted in chunks. It runs
        eagerly (no decode graphs); when the step is a speculative round instead, `step` runs the round and
        the chunks as two forwards. If the base fails, the prompts' sequences fail and the decode rows re-run
        on their own, so running streams go on, as in a two-forward step."""
        decode = []
        for seq in batch.seqs:
            start = {k: int(self.runner.kv(k).host_lengths[seq.row]) for k in seq.model_keys}
            decode.append(PrefillChunk(seq, start, len(seq.token_ids), decode=True))  # input: its last token
            for key in seq.model_keys:
                self.runner.kv(key).set_length(seq.row, len(seq.token_ids))
        chunks = decode + list(batch.prefill)
        rows = self.runner.make_batch([c.seq for c in chunks if c.final])
        self.runner.flush()
        now = time.monotonic()
        for c in batch.prefill:
            if c.seq.timings.scheduled is None:
                c.seq.timings.scheduled = now
        t_sched = time.perf_counter() - t0
        try:
            logits = self.runner.prefill(rows, chunks)
        except Exception as exc:
            log.exception("base forward failed in a mixed step: its prompts fail, its decode rows run alone")
            fetch(self.runner.tokens[:1])  # let the failed step's copies finish before staging is reused
            self.runner.step_done()
            for c in decode:  # nothing of the failed forward is counted as cached
                for key in c.seq.model_keys:
                    self.runner.kv(key).set_length(c.seq.row, c.end - 1)
            failed = self._fail([c.seq for c in batch.prefill], f"base forward failed: {type(exc).__name__}: {exc}")
            outputs, stats = self._decode_step(batch, time.perf_counter(), c0)
            return outputs + failed, stats
        t1 = time.perf_counter()
        self._advance_prompts(list(batch.prefill), logits)
        sampled = self._mix_and_sample(rows, logits, True)  # ends with the step's one host sync
        self.runner.step_done()
        outputs = self._after_prompts(list(batch.prefill), rows, logits)
        outputs += self._postprocess(rows, logits, sampled, True)
        num_tokens = sum(c.end - c.start[None] for c in chunks)
        return outputs, self._observe(True, len(chunks), num_tokens, t_sched, logits, t1, len(batch.preempted))

    def _after_prompts(self, chunks: list[PrefillChunk], rows: RowBatch | None, logits: StepLogits) -> list[EngineOutput]:
        """After a step's sync: prompt chunks that ran are cached (and their full blocks published); sequences
        whose earlier (non-final) chunk failed in a memory fail. Final chunks' failures are `_postprocess`'s."""
        final_failed = {rows.seqs[i].seq_id for i in logits.failed} if rows is not None else set()
        failed = [c.seq for c in chunks if c.seq.seq_id in logits.failed_chunks]
        for c in chunks:
            if c.seq.seq_id not in logits.failed_chunks and c.seq.seq_id not in final_failed:
                self.scheduler.prefilled(c.seq, c)  # publishes its blocks before anything can free them
        for seq in failed:
            seq.finish(FinishReason.ERROR, error=logits.failed_chunks[seq.seq_id])
        return self._retire(failed)

    def _prefill_step(self, batch: ScheduledBatch, t0: float) -> tuple[list[EngineOutput], StepStats | None]:
        """This step's prompt chunks: one forward per model over all of them; tokens are sampled only for
        the prompts whose last chunk this is (earlier chunks only fill the cache)."""
        chunks = list(batch.prefill)
        finals = [c.seq for c in chunks if c.final]
        rows = self.runner.make_batch(finals) if finals else None
        self.runner.flush()
        now = time.monotonic()
        for c in chunks:
            if c.seq.timings.scheduled is None:
                c.seq.timings.scheduled = now
        t_sched = time.perf_counter() - t0
        seqs = [c.seq for c in chunks]
        try:
            logits = self.runner.prefill(rows, chunks)
        except Exception as exc:  # the base failed: this step's newcomers fail, running streams go on
            return self._base_failed(seqs, exc), None
        t1 = time.perf_counter()
        self._advance_prompts(chunks, logits)
        if rows is not None:
            sampled = self._mix_and_sample(rows, logits, True)  # ends with the step's host sync
        else:
            fetch(self.runner.tokens[:1])  # no prompt ended: still sync, so staging buffers and pages are free after
        self.runner.step_done()
        outputs = self._after_prompts(chunks, rows, logits)
        if rows is not None:
            outputs += self._postprocess(rows, logits, sampled, True)
        num_tokens = sum(c.end - c.start[None] for c in chunks)  # the base's
        stats = self._observe(True, len(chunks), num_tokens, t_sched, logits, t1, 0 if batch.seqs else len(batch.preempted))
        return outputs, stats

    def _base_failed(self, seqs: list[Sequence], exc: Exception) -> list[EngineOutput]:
        """The base's forward raised: these sequences fail, the engine lives on."""
        log.exception("base forward failed")
        self.runner.step_done()
        return self._fail(seqs, f"base forward failed: {type(exc).__name__}: {exc}")

    def _observe(self, is_prefill: bool, batch_size: int, num_tokens: int, t_sched: float,
                 logits: StepLogits | SpecLogits, t1: float, preempted: int) -> StepStats | None:  # fmt: skip
        if self.observer is None:
            return None
        phases = {"schedule": t_sched, **logits.forward_seconds(), "mix_sample": time.perf_counter() - t1}
        stats = StepStats(is_prefill, batch_size, num_tokens, phases)
        self.observer.on_step(stats)
        self.observer.on_kv_cache(self.runner.kv_usage, preempted)
        return stats

    # -- speculative mixing ---------------------------------------------------------------------------
    def _step_clock(self) -> float:
        """What adaptive K times steps with: on a CPU the engine thread's CPU time (the steps' own cost, not
        the load other processes or the server's other threads put on the cores), on a GPU wall time
        (a step ends with its host sync, so the wall clock covers the device's work)."""
        return time.thread_time() if self.runner.device.type == "cpu" else time.perf_counter()

    def _lookahead(self, batch: ScheduledBatch) -> list[int] | None:
        """Drafts per row for a speculative round (their pages reserved), or None for a plain step.

        A row drafts at most one token fewer than it may still emit (the round adds one of its own), and
        none when the free pages (above the watermark) cannot hold its drafts: speculation never preempts.
        """
        spec = self.speculation
        betas = [spec.row_acceptance(m, s.spec_passed, s.spec_tests)
                 for s in batch.seqs if s.speculative and (m := s.memory_name) is not None] if spec else []  # fmt: skip
        if spec is None or not betas:
            return None
        k = spec.choose(len(batch.seqs), betas)
        if not k:
            return None
        k_rows = []
        for seq in batch.seqs:
            n = max(0, min(k, seq.max_len - len(seq.token_ids) - 1)) if seq.speculative else 0
            k_rows.append(n if n and self.scheduler.reserve_lookahead(seq, n) else 0)
        return k_rows if any(k_rows) else None

    def _speculative_step(
        self, batch: ScheduledBatch, rows: RowBatch, k_rows: list[int], c0: float, t_sched: float
    ) -> tuple[list[EngineOutput], StepStats | None]:
        key = (self.scheduler.version, tuple(k_rows))
        if self._plan is None or self._plan[0] != key:
            self._plan = (key, self.runner.make_plan(rows, k_rows))
        plan = self._plan[1]
        try:
            logits = self.runner.speculate(rows, plan)
        except Exception as exc:  # the base's verify failed (a memory's failure is contained in `speculate`)
            return self._base_failed(rows.seqs, exc), None
        t1 = time.perf_counter()
        result = self._accept_round(rows, plan, logits)  # ends with the step's one host sync
        self.runner.step_done()
        outputs = self._postprocess_round(rows, plan, logits, result)
        assert self.speculation is not None
        self.speculation.observe(len(rows.seqs), plan.k, self._step_clock() - c0)
        stats = self._observe(False, len(rows.seqs), len(rows.seqs) * (plan.k + 1), t_sched, logits, t1, len(batch.preempted))
        return outputs, stats

    def _accept_round(self, rows: RowBatch, plan: SpecPlan, logits: SpecLogits) -> _Round:
        """Mix at every verified position, run each position's acceptance test and residual draw, and end
        each row's run at its first rejection (or its last draft); the step's one host sync is here."""
        b, t = len(rows.seqs), plan.k + 1
        base_lp = torch.log_softmax(logits.base.float(), dim=-1)  # [B, T, V]
        q = torch.zeros_like(base_lp) if rows.sampling.any_sampled else None  # [B, T, V] q̃ each draft came from
        drafts = torch.zeros(b, t, dtype=torch.long, device=base_lp.device)  # [B, T]
        parts = []
        for g in rows.groups:
            # A row with several memories never drafts (k = 0): only position 0 of its groups' buffers is real;
            # routed rows never draft either.
            buf = logits.drafts[g.name]
            parts.append(_group_part(g, base_lp, buf.logp, self._group_context(g)))
            drafts.index_copy_(0, g.rows_dev, buf.tokens)
            if q is not None and buf.probs is not None:
                q.index_copy_(0, g.rows_dev, buf.probs)
        log_base_weight = rows.log_base_weight.unsqueeze(-1) if rows.log_base_weight is not None else None  # [B, 1, 1]
        logp = apply(base_lp, parts, log_base_weight)  # [B, T, V]
        pos = torch.arange(t, device=logp.device)  # [T]
        drafted = None  # [B, T] a draft at every position of every row: the common round, no mask needed
        if len(rows.spec_rows) < b or min(plan.k_rows) < plan.k:
            drafted = (rows.spec_mask[:, None] & (pos[None, :] <= plan.k_dev[:, None])).flatten()
        u = logits.uniforms.flatten(1) if logits.uniforms is not None else None  # [3, B * T]
        tokens, ok = accept(
            logp.flatten(0, 1), Drafts(drafts.flatten(), q.flatten(0, 1) if q is not None else None),
            drafted, rows.sampling.repeat(t), u,
        )  # fmt: skip
        tokens, ok = tokens.view(b, t), ok.view(b, t)
        # A row keeps its drafts up to the first rejected one, and the token drawn there (or at its last draft).
        stop = ~ok | (pos[None, :] >= plan.k_dev[:, None])  # [B, T]
        emitted = (~stop).long().cumprod(dim=1).sum(dim=1) + 1  # [B]
        last = (emitted - 1).unsqueeze(1)  # [B, 1]
        self.runner.tokens.index_copy_(0, rows.slots_dev, tokens.gather(1, last).squeeze(1))  # the next input
        for g in rows.groups:  # a routed row emits one token, at position 0 (it does not draft)
            if g.name in logits.drafts:
                self._advance_context(g, tokens[:, 0], base_lp[:, 0], logits.drafts[g.name].logp[:, 0])
        wanted = [tokens, emitted, ok.gather(1, last).squeeze(1)]
        if rows.logprob_rows:
            lp = logp.index_select(0, rows.logprob_rows_dev)  # [W, T, V]
            top_v, top_i = top_logprobs(lp, rows.num_top)  # [W, T, n]
            chosen = lp.gather(-1, tokens.index_select(0, rows.logprob_rows_dev).unsqueeze(-1)).squeeze(-1)  # [W, T]
            wanted += [chosen, top_v, top_i]
        host = fetch(*wanted)  # the one host sync of the step
        tok, emitted_h = host[0], host[1]
        logprobs: dict[tuple[int, int], TokenLogprob] = {}
        if rows.logprob_rows:
            chosen_h, top_vh, top_ih = host[3:6]
            for w, i in enumerate(rows.logprob_rows):
                n = rows.seqs[i].params.logprobs or 0
                for j in range(int(emitted_h[i])):
                    top = tuple(zip(top_ih[w, j, :n].tolist(), top_vh[w, j, :n].tolist(), strict=True))
                    logprobs[(i, j)] = TokenLogprob(int(tok[i, j]), float(chosen_h[w, j]), top)
        return _Round(tok, emitted_h, host[2], logprobs)

    def _postprocess_round(self, rows: RowBatch, plan: SpecPlan, logits: SpecLogits, r: _Round) -> list[EngineOutput]:
        """Each row appends its run (cut short by a stop id, EOS or its length) and every cache it uses is
        set to what it now holds: the rejected drafts' positions are forgotten, their pages kept."""
        now = time.monotonic()
        counts: dict[str, _SpecCounts] = {}
        for i, seq in enumerate(rows.seqs):
            if i in logits.failed:
                seq.finish(FinishReason.ERROR, error=logits.failed[i])
                continue
            n = int(r.emitted[i])
            if seq.speculative and seq.memory_name is not None:
                counts.setdefault(seq.memory_name, _SpecCounts()).add(seq, plan.k_rows[i], n, bool(r.last_accepted[i]))
            for j in range(n):
                seq.append(int(r.tokens[i, j]), r.logprobs.get((i, j)), now)
                if seq.is_finished:
                    break
            if not seq.is_finished:
                self.runner.set_cached(seq, len(seq.token_ids) - 1)  # its last token is the next input
        self.scheduler.kv_changed()
        self._count_speculation(counts)
        outputs = [o for s in rows.seqs if not s.is_finished and (o := s.take_output()) is not None]
        return outputs + self._retire([s for s in rows.seqs if s.is_finished])

    def _count_speculation(self, counts: dict[str, _SpecCounts]) -> None:
        for name, c in counts.items():
            if self.speculation is not None:
                self.speculation.observe_acceptance(name, c.tests, c.passed)
            if c.drafted and self.observer is not None:
                self.observer.on_speculation(name, c.drafted, c.accepted)

    def _rows(self, batch: ScheduledBatch) -> RowBatch:
        """The device view of this step's decode rows, reused until membership changes."""
        version = self.scheduler.version
        if self._decode_batch is None or self._decode_batch[0] != version:
            self._decode_batch = (version, self.runner.make_batch(batch.seqs))
        return self._decode_batch[1]

    def _mix_and_sample(self, rows: RowBatch, logits: StepLogits, is_prefill: bool) -> _Sampled:
        base_lp = torch.log_softmax(logits.base.float(), dim=-1)  # [B, V]
        mem_lps: dict[str, torch.Tensor] = {}
        parts = []
        for g in rows.groups:
            mem = logits.memories.get(g.name)
            if mem is None:  # the memory failed: its rows are failed below
                continue
            mem_lp = mem_lps[g.name] = memory_logprobs(mem, g.temperature)  # [b, V] log softmax(mem / T)
            parts.append(_group_part(g, base_lp, mem_lp, self._group_context(g)))
        logp = apply(base_lp, parts, rows.log_base_weight)  # [B, V] (1 − Σ αᵢ)·p_base + Σ αᵢ·pᵢ, in logs
        counter = None
        if rows.sampling.any_sampled:
            # Index of the token being drawn = tokens the base has cached (its length after this step's forward).
            counter = self.runner.kv(None).lengths.index_select(0, rows.slots_dev)  # [B]
        accepted = None
        if rows.spec_rows:
            tokens, accepted = self._virtual_draft(rows, mem_lps, logp, counter)
        else:
            tokens = sample(logp, rows.sampling, counter)  # [B]
        self.runner.tokens.index_copy_(0, rows.slots_dev, tokens)  # the next decode step's input
        for g in rows.groups:  # routed rows' EMAs take the new token's log-probs (on the device, whole groups)
            if g.name in mem_lps:
                self._advance_context(g, tokens, base_lp, mem_lps[g.name])
        wanted: list[torch.Tensor] = [tokens]
        if rows.logprob_rows:
            lp = logp.index_select(0, rows.logprob_rows_dev)  # [W, V]
            top_v, top_i = top_logprobs(lp, rows.num_top)  # [W, n]
            chosen = lp.gather(-1, tokens.index_select(0, rows.logprob_rows_dev).unsqueeze(-1)).squeeze(-1)  # [W]
            wanted += [chosen, top_v, top_i]
        echo = self._prompt_logprob_tensors(rows, logits) if is_prefill else {}
        for echoed in echo.values():
            wanted += echoed
        if accepted is not None:
            wanted.append(accepted)
        host = fetch(*wanted)  # the one host sync of the step
        tok = host[0]
        logprobs: dict[int, TokenLogprob] = {}
        if rows.logprob_rows:
            chosen_h, top_vh, top_ih = host[1:4]
            for j, i in enumerate(rows.logprob_rows):
                k = rows.seqs[i].params.logprobs or 0
                top = tuple(zip(top_ih[j, :k].tolist(), top_vh[j, :k].tolist(), strict=True))
                logprobs[i] = TokenLogprob(int(tok[i]), float(chosen_h[j]), top)
        prompt: dict[int, tuple[TokenLogprob | None, ...]] = {}
        at = 4 if rows.logprob_rows else 1
        for i in echo:
            chosen_h, top_vh, top_ih = host[at : at + 3]
            at += 3
            ids = rows.seqs[i].token_ids
            prompt[i] = (None, *(
                TokenLogprob(ids[t + 1], float(chosen_h[t]), tuple(zip(top_ih[t].tolist(), top_vh[t].tolist(), strict=True)))
                for t in range(len(ids) - 1)
            ))
        return _Sampled(tok, logprobs, prompt, host[-1] if accepted is not None else None)

    def _group_context(self, g: MemoryGroup) -> torch.Tensor | None:
        """[b, K] the group's rows' advantage EMAs when its router reads context features, else None."""
        if g.router is None or not g.router.context_decays:
            return None
        return self.context.rows(g.name, g.router.context_decays, g.slots_dev)

    def _advance_context(self, g: MemoryGroup, tokens: torch.Tensor, base_lp: torch.Tensor, mem_lp: torch.Tensor) -> None:
        """The group's rows took `tokens` [B] (whole batch) at distributions base_lp [B, V] and mem_lp [b, V] (the
        group's rows): advance their EMAs on the device. Fixed-α rows of the group advance too (unread, harmless)."""
        if g.router is None or not g.router.context_decays:
            return
        if not g.whole_batch:
            tokens, base_lp = tokens.index_select(0, g.rows_dev), base_lp.index_select(0, g.rows_dev)
        y = tokens.unsqueeze(-1)  # [b, 1]
        self.context.advance(g.name, g.router.context_decays, g.slots_dev, base_lp.gather(-1, y).squeeze(-1),
                             mem_lp.gather(-1, y).squeeze(-1))  # fmt: skip

    def _advance_prompts(self, chunks: list[PrefillChunk], logits: StepLogits) -> None:
        """Context-routed prompt chunks: their positions' targets' log-probs advance the rows' EMAs (from zero
        for a chunk at position 0), before the last chunk's position is mixed. One chunk at a time, on the device."""
        for c in chunks:
            by_model = logits.scored.get(c.seq.seq_id)
            use = c.seq.memories[0] if c.seq.memories else None
            if by_model is None or use is None or use.router is None or use.name not in by_model or None not in by_model:
                continue  # not context-routed, or a model failed (the row fails)
            start = c.start[None]
            targets = self.runner.upload(prompt_targets(c.seq.token_ids, start, c.end))  # [n]
            base_t, mem_t = target_logprobs(by_model[None], by_model[use.name], use.temperature, targets)
            self.context.prompt(use.name, use.router.context_decays, c.seq.row, start, base_t, mem_t)

    def _virtual_draft(
        self, rows: RowBatch, mem_lps: dict[str, torch.Tensor], logp: torch.Tensor, counter: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens [B] of a step that is not a round, and the speculative rows' acceptance tests [B].

        A speculative row's token goes through the same draft, acceptance test and residual draw as in a
        round (from the memory's distribution at this position), so its tokens never depend on which
        steps were rounds; the other rows (no draft) draw exactly as `sample` does.
        """
        q = torch.zeros_like(logp)  # [B, V]; rows without one memory never use theirs (they do not draft)
        for g in rows.groups:
            if g.name in mem_lps:
                q.index_copy_(0, g.rows_dev, mem_lps[g.name])
        u = speculative_uniforms(rows.sampling.seed, counter) if counter is not None else None  # [3, B]
        drafts = propose(q, rows.sampling, u[DRAFT] if u is not None else None)
        return accept(logp, drafts, rows.spec_mask, rows.sampling, u)

    def _prompt_logprob_tensors(self, rows: RowBatch, logits: StepLogits) -> dict[int, list[torch.Tensor]]:
        """Echo rows: the mixed log-prob of each prompt token given the ones before it, and the top-n."""
        out: dict[int, list[torch.Tensor]] = {}
        for i, by_model in logits.prompt.items():
            if i in logits.failed:
                continue
            seq = rows.seqs[i]
            targets = self.runner.upload(np.asarray(seq.token_ids[1:], dtype=np.int64))  # [T-1]
            lp = self._prompt_mixture(seq, by_model, targets)  # [T, V]
            chosen = lp[:-1].gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [T-1]
            top_v, top_i = top_logprobs(lp[:-1], seq.params.prompt_logprobs or 0)
            out[i] = [chosen, top_v, top_i]
        return out

    @staticmethod
    def _prompt_mixture(seq: Sequence, by_model: dict[str | None, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        """[T, V] the mixture at every prompt position of an echo row, from each model's logits [T, V]: its fixed
        α's, or (`"alpha": "auto"`) its router's α per position, reading, when it has context features, each
        position's EMAs over the prompt before it (the last position's: all of it)."""
        lp = torch.log_softmax(by_model[None].float(), dim=-1)  # [T, V]
        parts = []
        for use in seq.memories:
            mem_lp = memory_logprobs(by_model[use.name], use.temperature)  # [T, V]
            if use.router is None:
                parts.append(Part(mem_lp, math.log(use.alpha)))
                continue
            context = None
            if use.router.context_decays:
                y = targets.unsqueeze(-1)  # [T-1, 1]
                before, after = advantage_emas((mem_lp[:-1].gather(-1, y) - lp[:-1].gather(-1, y)).squeeze(-1),
                                               use.router.context_decays)  # fmt: skip
                context = torch.cat([before, after.float().unsqueeze(0)])  # [T, K]
            parts.append(routed_part(use.router, lp, mem_lp, context))
        w = base_weight([use.alpha for use in seq.memories])  # 1 − Σ αᵢ (1 routed: its router weighs the base)
        return apply(lp, parts, math.log(w) if w > 0 else float("-inf"))

    def _postprocess(self, rows: RowBatch, logits: StepLogits, sampled: _Sampled, is_prefill: bool) -> list[EngineOutput]:
        now = time.monotonic()
        for i, seq in enumerate(rows.seqs):
            if i in logits.failed:
                seq.finish(FinishReason.ERROR, error=logits.failed[i])
                continue
            if i in sampled.prompt_logprobs:
                seq.prompt_logprobs = sampled.prompt_logprobs[i]
            if is_prefill and seq.params.max_tokens == 0:
                seq.finish(FinishReason.LENGTH)  # prompt scoring only (echo)
                continue
            seq.append(int(sampled.tokens[i]), sampled.logprobs.get(i), now)
        if sampled.accepted is not None:
            counts: dict[str, _SpecCounts] = {}
            for i in rows.spec_rows:
                name = rows.seqs[i].memory_name
                if i not in logits.failed and name is not None:
                    counts.setdefault(name, _SpecCounts()).add(rows.seqs[i], 0, 1, bool(sampled.accepted[i]))
            self._count_speculation(counts)
        outputs = [o for s in rows.seqs if not s.is_finished and (o := s.take_output()) is not None]
        return outputs + self._retire([s for s in rows.seqs if s.is_finished])

    def _score(self, batch: ScheduledBatch) -> StepResult:
        job = batch.job
        assert job is not None
        try:
            assert job.current is not None
            _, ids, windows = job.current
            keys = list(zip(job.memory_names, job.request.temperatures, strict=True))
            lps = self.runner.score(keys, ids, windows, job.wants_distributions)
            mems = []
            for name in job.memory_names:
                mem = lps[name]
                if isinstance(mem, Exception):
                    raise mem
                mems.append(mem)
            base = lps[None]
            assert isinstance(base, torch.Tensor)
            job.add(base, mems if job.several else mems[0] if mems else None)
            if not job.done:
                return StepResult(batch.kind)
            out = JobOutput(job.request_id, result=job.result())
        except Exception as exc:  # the job's own failure: the engine goes on
            log.exception("perplexity job %s failed", job.request_id)
            out = JobOutput(job.request_id, error=exc)
        self._end_job(job)
        return StepResult(batch.kind, jobs=[out])

    def _end_job(self, job: PerplexityJob) -> None:
        self.scheduler.jobs.remove(job)
        for name in job.memory_names:
            self.registry.release(name)
        if job.memory_names:
            self.sweep_memories()

    def _fail(self, seqs: list[Sequence], message: str) -> list[EngineOutput]:
        for seq in seqs:
            seq.finish(FinishReason.ERROR, error=message)
        return self._retire(seqs)

    def _retire(self, seqs: list[Sequence]) -> list[EngineOutput]:
        """Free slots, pages and memories of finished sequences; return their final outputs."""
        if not seqs:
            return []
        self.scheduler.remove(seqs)
        outputs = []
        released = False
        for seq in seqs:
            for use in seq.memories:
                self.registry.release(use.name)
                released = True
            seq.memories = ()  # released once: a sequence retires once, but never release twice
            out = seq.take_output()
            if out is not None:
                outputs.append(out)
            if self.observer is not None:
                self.observer.on_request_finished(seq)
        if released:
            self.sweep_memories()
        return outputs

    def fail_all(self, message: str) -> StepResult:
        jobs = [JobOutput(j.request_id, error=RuntimeError(message)) for j in self.scheduler.jobs]
        for job in list(self.scheduler.jobs):
            self._end_job(job)
        outputs = self._fail([*self.scheduler.running, *self.scheduler.waiting], message)
        return StepResult(StepKind.IDLE, outputs, jobs)
