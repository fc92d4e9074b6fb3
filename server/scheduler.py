"""Who runs this step, and what KV memory they get.

Policy (nano-vllm's, plus KV budgeting): admit waiting sequences first (a prefill step) while a slot,
the token budget and KV pages allow; otherwise decode every running sequence, after making sure each
has a page for its next token — preempting the most recently admitted ones when pages run out (their
pages are freed; they wait at the head of the queue and re-run their prompt plus what they generated
so far, vLLM's recompute preemption). Perplexity work runs when nothing waits for a prefill,
alternating with decode steps so running streams keep producing tokens.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from server.kv import ModelKV, PagePool
from server.perplexity import PerplexityJob
from server.sequence import Sequence, Status

# Pages kept free when admitting, so a new prefill does not force the next decode step to preempt.
WATERMARK = 0.01


class StepKind(enum.Enum):
    IDLE = "idle"
    PREFILL = "prefill"
    DECODE = "decode"
    SCORE = "score"


@dataclass(frozen=True)
class ScheduledBatch:
    kind: StepKind
    seqs: list[Sequence]
    preempted: tuple[Sequence, ...] = ()
    job: PerplexityJob | None = None  # the perplexity job, for SCORE


class Scheduler:
    def __init__(
        self,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        pool: PagePool,
        kv_of: Callable[[str | None], ModelKV],
    ) -> None:
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.pool = pool
        self.kv_of = kv_of
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.jobs: deque[PerplexityJob] = deque()  # perplexity jobs, oldest first
        self._free_slots = list(range(max_num_seqs - 1, -1, -1))
        self._watermark = max(1, int(WATERMARK * pool.num_usable))
        self._score_turn = False
        self.version = 0  # bumped whenever `running` changes; a decode batch is rebuilt when it moves
        # Decode steps every running row can still take before one of them needs a new page: while it
        # lasts, a decode step skips the per-row check entirely. (-1: unknown, check.)
        self._room = -1
        self._room_version = -1

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def add_job(self, job: PerplexityJob) -> None:
        self.jobs.append(job)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.jobs)

    # -- KV accounting -----------------------------------------------------------------------------
    def pages_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Pages a waiting sequence needs, over the models it uses, to hold `num_tokens` tokens."""
        return sum(self.kv_of(k).blocks_for(num_tokens) for k in seq.model_keys)

    def _take_slot(self, seq: Sequence) -> None:
        slot = seq.slot = self._free_slots.pop()
        for key in seq.model_keys:
            kv = self.kv_of(key)
            kv.reserve(slot, len(seq.token_ids))
            kv.set_length(slot, len(seq.token_ids))

    def release(self, seq: Sequence) -> None:
        """Give back a sequence's pages and slot (it finished, failed or was preempted)."""
        if seq.slot is None:
            return
        for key in seq.model_keys:
            self.kv_of(key).free(seq.slot)
        self._free_slots.append(seq.slot)
        seq.slot = None

    # -- the policy ----------------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        admitted = self._admit()
        if admitted:
            return ScheduledBatch(StepKind.PREFILL, admitted)
        if self.jobs and (not self.running or self._score_turn):
            self._score_turn = False
            return ScheduledBatch(StepKind.SCORE, [], job=self.jobs[0])
        self._score_turn = bool(self.jobs)
        if not self.running:
            return ScheduledBatch(StepKind.IDLE, [])
        preempted = self._make_room_for_decode()
        return ScheduledBatch(StepKind.DECODE, list(self.running), preempted=tuple(preempted))

    def _admit(self) -> list[Sequence]:
        """Waiting sequences in order while a slot, the token budget and the KV pages allow.

        A prompt longer than the token budget is still admitted when it would run alone, so no
        request waits forever; `Engine.validate` refused those that could never fit in the KV cache.
        """
        admitted: list[Sequence] = []
        tokens = 0
        while self.waiting and len(self.running) + len(admitted) < self.max_num_seqs:
            seq = self.waiting[0]
            n = len(seq.token_ids)
            if admitted and tokens + n > self.max_num_batched_tokens:
                break
            reserve = 0 if not (self.running or admitted) else self._watermark
            if self.pages_needed(seq, n + 1) + reserve > self.pool.num_free:
                break
            self.waiting.popleft()
            self._take_slot(seq)
            seq.status = Status.RUNNING
            admitted.append(seq)
            tokens += n
        if admitted:
            self.running.extend(admitted)
            self.version += 1
        return admitted

    def _running_by_model(self) -> Iterator[tuple[ModelKV, list[Sequence], np.ndarray]]:
        """Per model in use: its KV view, the running rows that use it, and their slots."""
        by_key: dict[str | None, list[Sequence]] = {None: self.running}
        for seq in self.running:
            if seq.memory_name is not None:
                by_key.setdefault(seq.memory_name, []).append(seq)
        for key, seqs in by_key.items():
            yield self.kv_of(key), seqs, np.asarray([s.row for s in seqs], dtype=np.int64)

    def _rows_at_page_boundary(self) -> set[int]:
        """seq_ids of running rows whose next token starts a new page in some model (numpy, per model)."""
        needy: set[int] = set()
        for kv, seqs, slots in self._running_by_model():
            full = kv.host_lengths[slots] >= kv.host_blocks[slots] * kv.block_size
            needy.update(seqs[j].seq_id for j in np.flatnonzero(full))
        return needy

    def kv_changed(self) -> None:
        """Lengths or pages changed outside the scheduler (a rollback): re-check before the next decode."""
        self._room = -1

    def _steps_of_room(self) -> int:
        """Tokens every running row can still append in every model without a new page."""
        return min(
            int((kv.host_blocks[slots] * kv.block_size - kv.host_lengths[slots]).min())
            for kv, _, slots in self._running_by_model()
        )

    def _make_room_for_decode(self) -> list[Sequence]:
        """Give every running row a page for its next token; preempt from the back when pages run out."""
        if self._room_version == self.version and self._room >= 1:
            self._room -= 1  # every row still has room for this step's token
            return []
        preempted: list[Sequence] = []
        needy = self._rows_at_page_boundary()
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            if seq.seq_id not in needy:
                i += 1
                continue
            slot = seq.row
            need = [(kv, int(kv.host_lengths[slot]) + 1) for kv in map(self.kv_of, seq.model_keys)]
            missing = sum(kv.pages_missing(slot, n) for kv, n in need)
            if missing > self.pool.num_free:
                self._trim_lookahead()  # spare draft pages go before anyone is preempted
            while missing > self.pool.num_free and self.running[-1] is not seq:
                preempted.append(self._preempt(self.running[-1]))
            if missing > self.pool.num_free:  # it is the last one left that could give pages back
                preempted.append(self._preempt(seq))
                continue
            for kv, n in need:
                kv.reserve(slot, n)
            i += 1
        if self.running:
            self._room, self._room_version = self._steps_of_room() - 1, self.version  # this step takes one
        return preempted

    def reserve_lookahead(self, seq: Sequence, num_tokens: int) -> bool:
        """Pages for `num_tokens` more tokens of a running row in every model it uses (a speculative round
        caches its drafts), only from free pages above the watermark: speculation never preempts anyone.
        Returns whether the row has them. They stay with the row for its later rounds, until it finishes
        or another row needs a page and none is free (`_trim_lookahead`)."""
        slot = seq.row
        need = [(kv, int(kv.host_lengths[slot]) + 1 + num_tokens) for kv in map(self.kv_of, seq.model_keys)]
        missing = sum(kv.pages_missing(slot, n) for kv, n in need)
        if missing and missing + self._watermark > self.pool.num_free:
            return False
        for kv, n in need:
            kv.reserve(slot, n)
        return True

    def _trim_lookahead(self) -> None:
        """Every running row keeps only the pages its next token needs, in every model."""
        for kv, seqs, _ in self._running_by_model():
            for seq in seqs:
                kv.trim(seq.row, int(kv.host_lengths[seq.row]) + 1)

    def _preempt(self, seq: Sequence) -> Sequence:
        self.running.remove(seq)
        self.release(seq)
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        seq.wants_prompt_logprobs = False  # already sent with the first prefill
        self.waiting.appendleft(seq)
        self.version += 1
        return seq

    def remove(self, seqs: list[Sequence]) -> None:
        gone = {s.seq_id for s in seqs}
        if any(s.seq_id in gone for s in self.running):
            self.version += 1
        self.running = [s for s in self.running if s.seq_id not in gone]
        self.waiting = deque(s for s in self.waiting if s.seq_id not in gone)
        for seq in seqs:
            self.release(seq)

    def find(self, request_id: str) -> Sequence | None:
        for seq in (*self.running, *self.waiting):
            if seq.request_id == request_id:
                return seq
        return None

