"""Who runs this step: admit waiting sequences (a prefill step) or decode all running ones."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from server.sequence import Sequence, Status


@dataclass(frozen=True)
class ScheduledBatch:
    seqs: list[Sequence]
    is_prefill: bool


class Scheduler:
    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        """Prefill first (new requests start as soon as there is room), else one decode step for all.

        A prompt longer than the token budget is still admitted when it would run alone, so no
        request can wait forever.
        """
        admitted: list[Sequence] = []
        tokens = 0
        while self.waiting and len(self.running) + len(admitted) < self.max_num_seqs:
            seq = self.waiting[0]
            if admitted and tokens + seq.num_prompt_tokens > self.max_num_batched_tokens:
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            admitted.append(seq)
            tokens += seq.num_prompt_tokens
        if admitted:
            self.running.extend(admitted)
            return ScheduledBatch(admitted, is_prefill=True)
        return ScheduledBatch(list(self.running), is_prefill=False)

    def remove(self, seqs: list[Sequence]) -> None:
        gone = {s.seq_id for s in seqs}
        self.running = [s for s in self.running if s.seq_id not in gone]
        self.waiting = deque(s for s in self.waiting if s.seq_id not in gone)

    def find(self, request_id: str) -> Sequence | None:
        for seq in (*self.running, *self.waiting):
            if seq.request_id == request_id:
                return seq
        return None
