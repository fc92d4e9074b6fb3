"""The synchronous engine: one `step()` = schedule → forward → mix → named readback → postprocess.

It owns no thread; `AsyncEngine` drives it from one. Requests come in through `server.admission` (checked,
their memories bound) and wait in the scheduler. Tests drive it directly, step by step. It works
on token ids only: text and stop strings are `server.output`'s business, off the engine thread.

Every step that runs the models is one or two forwards, each through the same pipeline (`_run`): a
forward object (`server.step`: decode, prefill or a speculative round) runs the models, mixes and draws on
the device and names what the host needs (`server.mixer.Readback`); the engine reads it all in one `fetch`
(the step's one host synchronisation, `_read`) and the forward object postprocesses its sequences with the
named host arrays. A `Frame` owns the step's clocks, observer events and base failures. Everything else
the device needs is already there: each slot's last token (written when it is drawn), KV tables and
lengths (updated in place), and the batch's per-row parameters (uploaded when the batch's membership
changes, not every step).

With `speculative_tokens` K > 0 a decode step may be a speculative round instead (`server.speculative`):
each memory drafts k <= K tokens per row, the base verifies them in one forward; still one `fetch`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from server.admission import Admission
from server.config import EngineConfig
from server.errors import forward_failed
from server.loader import LoadedModel
from server.mixer import Host, Mixer, Readback
from server.perplexity import PerplexityJob
from server.registry import MemoryRegistry
from server.request import EngineOutput, FinishReason, GenerationRequest, PerplexityRequest
from server.runner import ModelRunner, RowBatch, SpecPlan
from server.scheduler import PrefillChunk, ScheduledBatch, Scheduler, StepKind
from server.sequence import Sequence
from server.speculative import SpeculationController
from server.step import (
    CacheUsage,
    DecodeForward,
    EngineObserver,
    EngineRound,
    Forward,
    Frame,
    JobOutput,
    PrefillForward,
    StepResult,
    StepStats,
)
from server.transfer import fetch

log = logging.getLogger(__name__)


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
        self.admission = Admission(base, registry, self.runner, self.max_model_len, self.prepare_memory)
        self.scheduler = Scheduler(
            self.config.max_num_seqs,
            self.config.max_num_batched_tokens,
            self.runner.pool,
            self.runner.caches,
            chunked_prefill=self.config.enable_chunked_prefill,
        )
        self._decode_batch: tuple[int, RowBatch] | None = None  # (scheduler version, batch)
        self._plan: tuple[tuple[int, tuple[int, ...]], SpecPlan] | None = None  # ((version, k per row), plan)
        self.mixer = Mixer(self.runner, self.config.max_num_seqs)
        self.context = self.mixer.context  # routers' advantage EMAs per row
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

    # -- admission (`server.admission`) ------------------------------------------------------------
    def validate(self, request: GenerationRequest) -> None:
        self.admission.validate(request)

    def add_request(self, request: GenerationRequest) -> Sequence:
        seq = self.admission.sequence(request)
        self.scheduler.add(seq)
        return seq

    def add_perplexity(self, request: PerplexityRequest) -> PerplexityJob:
        job = self.admission.perplexity_job(request)
        self.scheduler.add_job(job)
        return job

    def abort_request(
        self, request_id: str, reason: FinishReason = FinishReason.ABORT
    ) -> EngineOutput | None:
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

        O(1) per model (lengths and the pages past the new end); speculative decoding rolls rejected drafts
        back.
        """
        if seq.slot is None or seq.is_finished:
            raise ValueError("only a running sequence can be rolled back")
        # its advantage EMAs hold the forgotten tokens; no caller needs to undo them (yet)
        if seq.context_routed:
            raise ValueError("a row routed with context features cannot be rolled back")
        seq.rollback(num_tokens)
        self.runner.caches.rollback(seq, num_tokens - 1)  # the last token is the next input, not cached
        self.runner.set_last_token(seq.row, seq.token_ids[-1])
        self.scheduler.kv_changed()

    def cache_usage(self) -> CacheUsage:
        pool = self.runner.pool
        return CacheUsage(
            pool.num_free, pool.num_usable, self.scheduler.num_free_slots, self.config.max_num_seqs
        )

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
        """Decode rows first, then prompt chunks within the token budget. A step with both (MIXED) runs them
        in one forward per model (`PrefillForward` with decode segments); a step of decode rows alone runs the
        decode graphs (or a speculative round), one of prompt chunks alone a packed prefill. When a MIXED
        step's decode rows are a speculative round, the round and the chunks are two forwards."""
        frame = Frame(self)
        batch = self.scheduler.schedule()
        self._report_prefix_stats()
        if batch.kind is StepKind.IDLE:
            return StepResult(batch.kind)
        if batch.kind is StepKind.SCORE:
            # making room for decode preempted, then it scored
            if batch.preempted and self.observer is not None:
                self.observer.on_kv_cache(self.runner.kv_usage, len(batch.preempted))
            return self._score(batch)
        preempted = len(batch.preempted)
        # reserves draft pages
        k_rows = None if batch.kind is StepKind.PREFILL else self._lookahead(batch.seqs)
        if batch.kind is StepKind.PREFILL:
            outputs, stats = self._run(frame, self._prefill(batch.prefill), preempted)
        elif batch.kind is StepKind.MIXED and k_rows is None:
            outputs, stats = self._run(frame, self._prefill(batch.prefill, batch.seqs), preempted)
        else:
            outputs, stats = self._run(frame, self._decode(batch.seqs, k_rows), preempted)
            if batch.prefill:
                frame.start()
                more, _ = self._run(frame, self._prefill(batch.prefill), 0)
                outputs += more
        return StepResult(batch.kind, outputs, stats=stats)

    def _run(
        self, frame: Frame, fw: Forward[Any], preempted: int
    ) -> tuple[list[EngineOutput], StepStats | None]:
        """One forward's pipeline: forward → mix → named readback (the one host sync) → postprocess."""
        frame.scheduled(fw.seqs)
        try:
            logits = fw.forward()
        except Exception as exc:  # the base failed: this forward's sequences fail, the engine lives on
            if isinstance(fw, PrefillForward) and fw.decode:
                return self._mixed_failed(frame, fw, exc, preempted)
            return frame.base_failed(fw.seqs, exc), None
        frame.forwarded()
        host = self._read(fw.mix(logits))
        self.runner.step_done()
        fw.postprocess(logits, host)
        # what a step drafting k cost, for adaptive K
        if self.speculation is not None and fw.spec_k is not None:
            self.speculation.observe(len(fw.seqs), fw.spec_k, frame.seconds())
        outputs = [o for s in fw.seqs if not s.is_finished and (o := s.take_output()) is not None]
        outputs += self._retire(list(dict.fromkeys(s for s in fw.seqs if s.is_finished)))
        return outputs, frame.observe(fw, logits, preempted)

    @staticmethod
    def _read(wanted: Readback) -> Host:
        """The step's one host synchronisation: every tensor the host needs, by name."""
        return dict(zip(wanted, fetch(*wanted.values()), strict=True))

    def _mixed_failed(
        self, frame: Frame, fw: PrefillForward, exc: Exception, preempted: int
    ) -> tuple[list[EngineOutput], StepStats | None]:
        """The base failed in a mixed step: its prompts fail, and its decode rows re-run on their own, so that
        running streams go on as in a two-forward step."""
        log.exception("base forward failed in a mixed step: its prompts fail, its decode rows run alone")
        fetch(self.runner.tokens[:1])  # let the failed step's copies finish before staging is reused
        self.runner.step_done()
        for c in fw.chunks[: len(fw.decode)]:  # nothing of the failed forward is counted as cached
            self.runner.caches.accepted(c.seq, c.end - 1)
        failed = self.fail([c.seq for c in fw.chunks[len(fw.decode) :]], forward_failed("base", exc))
        frame.start()
        outputs, stats = self._run(frame, self._decode(fw.decode, self._lookahead(fw.decode)), preempted)
        return outputs + failed, stats

    def _report_prefix_stats(self) -> None:
        stats, self.scheduler.prefix_stats = self.scheduler.prefix_stats, []
        if self.observer is not None:
            for st in stats:
                self.observer.on_prefix_cache(st.cache, st.queries, st.hits)

    def step_clock(self) -> float:
        """What adaptive K times steps with: on a CPU the engine thread's CPU time (the steps' own cost, not
        the load other processes or the server's other threads put on the cores), on a GPU wall time
        (a step ends with its host sync, so the wall clock covers the device's work)."""
        return time.thread_time() if self.runner.device.type == "cpu" else time.perf_counter()

    def _lookahead(self, seqs: list[Sequence]) -> list[int] | None:
        """Drafts per row for a speculative round (their pages reserved: before the flush), or None for a
        plain step."""
        if self.speculation is None:
            return None
        return self.speculation.lookahead(seqs, self.scheduler.reserve_lookahead)

    # -- the forwards --------------------------------------------------------------------------------
    def _decode(self, seqs: list[Sequence], k_rows: list[int] | None) -> Forward[Any]:
        """The decode rows' forward: the decode graphs, or a speculative round when `k_rows` drafts."""
        self.runner.flush()  # the scheduler's KV changes reach the device
        version = self.scheduler.version
        if self._decode_batch is None or self._decode_batch[0] != version:  # reused until membership changes
            self._decode_batch = (version, self.runner.make_batch(seqs))
        rows = self._decode_batch[1]
        if k_rows is None:
            return DecodeForward(self, rows)
        key = (version, tuple(k_rows))
        if self._plan is None or self._plan[0] != key:
            self._plan = (key, self.runner.make_plan(rows, k_rows))
        return EngineRound(self, rows, self._plan[1])

    def _prefill(
        self, chunks: tuple[PrefillChunk, ...] | list[PrefillChunk], decode: list[Sequence] | None = None
    ) -> PrefillForward:
        """Prompt chunks (and, in a mixed step, decode rows as one-token segments) in one forward per
        model."""
        # A decode row is a one-token segment: its input is its last token, which every cache counts from
        # now.
        segments = [
            PrefillChunk(s, self.runner.caches.decode_segment(s), len(s.token_ids), decode=True)
            for s in decode or []
        ]
        return PrefillForward(self, segments + list(chunks), decode or [])

    def _score(self, batch: ScheduledBatch) -> StepResult:
        job = batch.job
        assert job is not None
        try:
            job.score_next(self.runner)
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

    def fail(self, seqs: list[Sequence], message: str) -> list[EngineOutput]:
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
        outputs = self.fail([*self.scheduler.running, *self.scheduler.waiting], message)
        return StepResult(StepKind.IDLE, outputs, jobs)


