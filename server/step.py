"""The parts of one engine step (`Engine.step`): the frame that times it, reports it and fails it, and the
forward objects its pipeline drives, forward → mix → named readback → postprocess (`Engine._run`).

`DecodeForward` runs decode rows on the decode graphs; `PrefillForward` packs prompt chunks (and, in a mixed
step, the decode rows as one-token segments) into one forward per model; `EngineRound` is a speculative
round (`server.speculative.SpeculativeRound`). Each names what its host needs (`server.mixer.Readback`),
and postprocesses its sequences from the named host arrays; retiring them is the engine's.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from server.errors import forward_failed
from server.mixer import Host, Readback
from server.request import EngineOutput, FinishReason, PerplexityResult
from server.runner import RowBatch, SpecLogits, SpecPlan, StepLogits
from server.scheduler import PrefillChunk, StepKind
from server.sequence import Sequence
from server.speculative import SpecCounts, SpeculativeRound

if TYPE_CHECKING:
    from server.engine import Engine

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


Logits = TypeVar("Logits", StepLogits, SpecLogits)


class Forward(Protocol[Logits]):
    """One forward of a step, as `Engine._run` drives it: forward → mix (on the device, naming what the host
    reads) → postprocess (its sequences, with the named host arrays)."""

    seqs: list[Sequence]  # every sequence it runs (each is postprocessed)
    is_prefill: bool
    num_tokens: int  # tokens the base processes
    spec_k: int | None  # the drafts a step with speculative rows times itself as (None: not timed)

    def forward(self) -> Logits: ...
    def mix(self, logits: Logits) -> Readback: ...
    def postprocess(self, logits: Logits, host: Host) -> None: ...


class Frame:
    """One step's clocks (schedule, forward, mix + postprocess), its observer events and its base failures."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.c0 = engine.step_clock()  # what adaptive K times the whole step with
        self.start()

    def start(self) -> None:
        """A forward starts being prepared (a step of two forwards times each on its own)."""
        self.t0 = self.t1 = time.perf_counter()
        self.t_sched = 0.0

    def scheduled(self, seqs: list[Sequence]) -> None:
        now = time.monotonic()
        for seq in seqs:
            if seq.timings.scheduled is None:
                seq.timings.scheduled = now
        self.t_sched = time.perf_counter() - self.t0

    def forwarded(self) -> None:
        self.t1 = time.perf_counter()

    def seconds(self) -> float:
        return self.engine.step_clock() - self.c0

    def base_failed(self, seqs: list[Sequence], exc: Exception) -> list[EngineOutput]:
        """The base's forward raised: these sequences fail, the engine lives on."""
        log.exception("base forward failed")
        self.engine.runner.step_done()
        return self.engine.fail(seqs, forward_failed("base", exc))

    def observe(self, fw: Forward[Any], logits: StepLogits | SpecLogits, preempted: int) -> StepStats | None:
        observer = self.engine.observer
        if observer is None:
            return None
        phases = {
            "schedule": self.t_sched,
            **logits.forward_seconds(),
            "mix_sample": time.perf_counter() - self.t1,
        }
        stats = StepStats(fw.is_prefill, len(fw.seqs), fw.num_tokens, phases)
        observer.on_step(stats)
        observer.on_kv_cache(self.engine.runner.kv_usage, preempted)
        return stats


def count_speculation(engine: Engine, counts: dict[str, SpecCounts]) -> None:
    for name, c in counts.items():
        if engine.speculation is not None:
            engine.speculation.observe_acceptance(name, c.tests, c.passed)
        if c.drafted and engine.observer is not None:
            engine.observer.on_speculation(name, c.drafted, c.accepted)


def postprocess_rows(
    engine: Engine, rows: RowBatch, logits: StepLogits, host: Host, is_prefill: bool
) -> None:
    """Each row appends its token (or fails, or ends after its echo), and the speculative rows' acceptance
    tests of a plain step are counted."""
    sampled = engine.mixer.sampled(rows, logits, host)
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
        counts: dict[str, SpecCounts] = {}
        for i in rows.spec_rows:
            name = rows.seqs[i].memory_name
            if i not in logits.failed and name is not None:
                counts.setdefault(name, SpecCounts()).add(rows.seqs[i], 0, 1, bool(sampled.accepted[i]))
        count_speculation(engine, counts)


def after_prompts(
    engine: Engine, chunks: list[PrefillChunk], rows: RowBatch | None, logits: StepLogits
) -> None:
    """After a step's sync: prompt chunks that ran are cached (and their full blocks published); sequences
    whose earlier (non-final) chunk failed in a memory fail. Final chunks' failures are
    `postprocess_rows`'s."""
    final_failed = {rows.seqs[i].seq_id for i in logits.failed} if rows is not None else set()
    for c in chunks:
        if c.seq.seq_id not in logits.failed_chunks and c.seq.seq_id not in final_failed:
            engine.scheduler.prefilled(c.seq, c)  # publishes its blocks before anything can free them
    for c in chunks:
        if c.seq.seq_id in logits.failed_chunks:
            c.seq.finish(FinishReason.ERROR, error=logits.failed_chunks[c.seq.seq_id])


class DecodeForward:
    """Decode rows on the decode graphs, one token each."""

    is_prefill = False

    def __init__(self, engine: Engine, rows: RowBatch) -> None:
        self.engine, self.rows = engine, rows
        self.seqs = rows.seqs
        self.num_tokens = len(rows.seqs)
        # a plain step beside speculative rows is timed as k = 0
        self.spec_k: int | None = 0 if rows.spec_rows else None

    def forward(self) -> StepLogits:
        return self.engine.runner.decode(self.rows)

    def mix(self, logits: StepLogits) -> Readback:
        return self.engine.mixer.mix(self.rows, logits, False)

    def postprocess(self, logits: StepLogits, host: Host) -> None:
        postprocess_rows(self.engine, self.rows, logits, host, False)


class PrefillForward:
    """Prompt chunks in one packed forward per model (and, in a mixed step, the decode rows as one-token
    segments in front, vLLM's mixed batch: one forward instead of two saves a whole forward's fixed cost,
    which is what a running stream's inter-token latency pays while a long prompt is admitted in chunks).
    Tokens are drawn only for the rows whose last chunk this is (earlier chunks only fill the cache)."""

    is_prefill = True
    spec_k: int | None = None

    def __init__(self, engine: Engine, chunks: list[PrefillChunk], decode: list[Sequence]) -> None:
        self.engine, self.chunks, self.decode = engine, chunks, decode
        self.prompts = chunks[len(decode) :]
        finals = [c.seq for c in chunks if c.final]
        self.rows = engine.runner.make_batch(finals) if finals else None
        engine.runner.flush()  # the scheduler's KV changes reach the device
        self.seqs = [c.seq for c in chunks]
        self.num_tokens = sum(c.end - c.start[None] for c in chunks)  # the base's

    def forward(self) -> StepLogits:
        return self.engine.runner.prefill(self.rows, self.chunks)

    def mix(self, logits: StepLogits) -> Readback:
        self.engine.mixer.advance_prompts(self.prompts, logits)
        if self.rows is None:  # no prompt ended: still sync, so staging buffers and pages are free after
            return {"sync": self.engine.runner.tokens[:1]}
        return self.engine.mixer.mix(self.rows, logits, True)

    def postprocess(self, logits: StepLogits, host: Host) -> None:
        after_prompts(self.engine, self.prompts, self.rows, logits)
        if self.rows is not None:
            postprocess_rows(self.engine, self.rows, logits, host, True)


class EngineRound(SpeculativeRound):
    """A speculative round, as the engine runs it: then the scheduler's KV view and the counts are updated."""

    def __init__(self, engine: Engine, rows: RowBatch, plan: SpecPlan) -> None:
        super().__init__(engine.runner, engine.mixer, rows, plan)
        self.engine = engine
        self.spec_k: int | None = plan.k

    def postprocess(self, logits: SpecLogits, host: Host) -> None:
        super().postprocess(logits, host)
        self.engine.scheduler.kv_changed()
        count_speculation(self.engine, self.counts)
