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
from collections.abc import Callable
from dataclasses import dataclass

from server.kv import ModelKV, PagePool
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
    job: object | None = None  # the perplexity job, for SCORE


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
        self.jobs: deque = deque()  # perplexity jobs, oldest first
        self._free_slots = list(range(max_num_seqs - 1, -1, -1))
        self._watermark = max(1, int(WATERMARK * pool.num_usable))
        self._score_turn = False
        self.version = 0  # bumped whenever `running` changes; a decode batch is rebuilt when it moves

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def add_job(self, job: object) -> None:
        self.jobs.append(job)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.jobs)

    # -- KV accounting -----------------------------------------------------------------------------
    def pages_needed(self, seq: Sequence, num_tokens: int) -> int:
        slot = seq.slot
        return sum(
            self.kv_of(k).pages_missing(slot, num_tokens) if slot is not None else self.kv_of(k).blocks_for(num_tokens)
            for k in seq.model_keys
        )

    def _take_slot(self, seq: Sequence) -> None:
        seq.slot = self._free_slots.pop()
        for key in seq.model_keys:
            kv = self.kv_of(key)
            kv.reserve(seq.slot, len(seq.token_ids))
            kv.set_length(seq.slot, len(seq.token_ids))

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

    def _make_room_for_decode(self) -> list[Sequence]:
        """Give every running row a page for its next token; preempt from the back when pages run out."""
        preempted: list[Sequence] = []
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            need = [(self.kv_of(k), int(self.kv_of(k).host_lengths[seq.slot]) + 1) for k in seq.model_keys]
            missing = sum(kv.pages_missing(seq.slot, n) for kv, n in need)  # type: ignore[arg-type]
            while missing > self.pool.num_free and self.running[-1] is not seq:
                preempted.append(self._preempt(self.running[-1]))
            if missing > self.pool.num_free:  # it is the last one left that could give pages back
                preempted.append(self._preempt(seq))
                continue
            for kv, n in need:
                kv.reserve(seq.slot, n)  # type: ignore[arg-type]
            i += 1
        return preempted

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
