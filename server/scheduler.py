"""Who runs this step, and what KV memory they get.

Policy (vLLM's): running sequences decode first — each gets a page for its next token, preempting the
most recently admitted ones when pages run out (their pages are released; they wait at the head of
the queue and re-run their prompt plus what they generated so far, vLLM's recompute preemption) —
then prompts fill what is left of the step's token budget (`max_num_batched_tokens`, each decode row
counting one token): first the unfinished prompts of admitted sequences, in order, then waiting ones
while a slot and KV pages allow. With chunked prefill a prompt longer than what is left is split into
chunks over several steps, so running streams keep producing a token every step while it is admitted;
without it a prompt runs whole, and one longer than the budget runs when no other prompt does (so no
request waits forever). Perplexity work runs when no prompt is scheduled, alternating with decode
steps so running streams keep producing tokens.

Admission reserves pages for the whole prompt at once (a chunked prompt never waits for pages halfway)
and, with prefix caching, starts each model's block table with the cached blocks of the prompt's
prefix (`ModelKV.match` / `attach`), which then need neither pages nor compute.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from server.kv import ModelKV, PagePool, SequenceKV
from server.perplexity import PerplexityJob
from server.sequence import Sequence, Status

# Pages kept free when admitting, so a new prefill does not force the next decode step to preempt.
WATERMARK = 0.01
# Positions per step of a prompt routed by a router with context features: the runner keeps every position's
# logits of such a chunk in each model ([n, V]; 512 × 152k bfloat16 ≈ 156 MB), so its chunks are capped, even
# with chunked prefill off (its state carries across chunks). Echo rows run whole as before.
CONTEXT_CHUNK_TOKENS = 512


class StepKind(enum.Enum):
    IDLE = "idle"
    PREFILL = "prefill"  # prompt chunks only
    DECODE = "decode"  # decode rows only
    MIXED = "mixed"  # decode rows, then prompt chunks
    SCORE = "score"


@dataclass(frozen=True)
class PrefillChunk:
    """Prompt tokens [start[model], end) of one sequence, computed in each model it uses this step."""

    seq: Sequence
    start: dict[str | None, int]  # tokens each model already holds (a prefix-cache hit, earlier chunks)
    end: int
    decode: bool = False  # a decoding row's next token, run in the same forward as prompt chunks (MIXED step)

    @property
    def final(self) -> bool:
        """The prompt's last chunk (or a decode row): its last position's logits give the next token."""
        return self.end >= self.seq.prefill_len


@dataclass(frozen=True)
class PrefixStats:
    """Prefix-cache lookups of one admission, in tokens (vLLM's queries / hits), per cache."""

    cache: str  # "base" or "memory"
    queries: int
    hits: int


@dataclass(frozen=True)
class ScheduledBatch:
    kind: StepKind
    seqs: list[Sequence]  # decode rows
    preempted: tuple[Sequence, ...] = ()
    job: PerplexityJob | None = None  # the perplexity job, for SCORE
    prefill: tuple[PrefillChunk, ...] = ()  # prompt chunks, after the decode rows


class Scheduler:
    def __init__(
        self,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        pool: PagePool,
        kv_of: Callable[[str | None], ModelKV] | SequenceKV,
        chunked_prefill: bool = True,
    ) -> None:
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.chunked_prefill = chunked_prefill
        self.pool = pool
        # Lengths and pages change through `caches` only (its events); `kv_of` is for reading them.
        self.caches = kv_of if isinstance(kv_of, SequenceKV) else SequenceKV(kv_of)
        self.kv_of = self.caches.kv_of
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.jobs: deque[PerplexityJob] = deque()  # perplexity jobs, oldest first
        self._free_slots = list(range(max_num_seqs - 1, -1, -1))
        self._watermark = max(1, int(WATERMARK * pool.num_usable))
        self._score_turn = False
        self.version = 0  # bumped whenever the decoding rows change; a decode batch is rebuilt when it moves
        # Decode steps every running row can still take before one of them needs a new page: while it
        # lasts, a decode step skips the per-row check entirely. (-1: unknown, check.)
        self._room = -1
        self._room_version = -1
        self.prefix_stats: list[PrefixStats] = []  # lookups since the engine last read them

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def add_job(self, job: PerplexityJob) -> None:
        self.jobs.append(job)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.jobs)

    @property
    def decoding(self) -> list[Sequence]:
        """Running sequences whose prompt is wholly cached: they decode."""
        return [s for s in self.running if not s.in_prefill]

    # -- KV accounting -----------------------------------------------------------------------------
    def pages_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Pages a waiting sequence needs, over the models it uses, to hold `num_tokens` tokens (no hits)."""
        return sum(self.kv_of(k).blocks_for(num_tokens) for k in seq.model_keys)

    def _lookup(self, seq: Sequence) -> dict[str | None, list[int]]:
        """Cached pages of the sequence's prefix, per model. Echo (prompt log-prob) requests bypass the cache:
        they need every prompt position's logits, which only a full computation gives. Hits stop before the
        prompt's last token: it is always computed (its logits give the first new token) and, as the point a
        rollback may return to, it must lie in a private page. Rows routed with context features bypass it
        too: their advantage EMAs need both models' log-probs at every position, which a cached prefix does
        not keep (so after a preemption they recompute from the start, and their state with it)."""
        if seq.wants_prompt_logprobs or seq.context_routed:
            return {k: [] for k in seq.model_keys}
        limit = seq.num_prompt_tokens - 1
        return {k: (kv := self.kv_of(k)).match(seq.token_ids, limit // kv.block_size) for k in seq.model_keys}

    def _cost(self, seq: Sequence, hits: dict[str | None, list[int]], num_tokens: int) -> int:
        """Free pages admitting `seq` takes: new pages beyond its hits, plus hits that sit cached-free."""
        cost = 0
        for key, pages in hits.items():
            cost += self.kv_of(key).blocks_for(num_tokens) - len(pages)
            cost += sum(1 for p in pages if self.pool.refs[p] == 0)
        return cost

    def _take_slot(self, seq: Sequence, hits: dict[str | None, list[int]]) -> None:
        seq.slot = self._free_slots.pop()
        n = len(seq.token_ids)
        cached = self.caches.admit(seq, hits)
        for key in seq.model_keys:
            if not (seq.wants_prompt_logprobs or seq.context_routed) and self.kv_of(key).prefix_caching:
                self.prefix_stats.append(PrefixStats("base" if key is None else "memory", n, cached[key]))
        seq.prefill_len = n
        seq.num_computed = min(cached.values())

    def release(self, seq: Sequence) -> None:
        """Give back a sequence's pages and slot (it finished, failed or was preempted)."""
        if seq.slot is None:
            return
        self.caches.release(seq)
        self._free_slots.append(seq.slot)
        seq.slot = None
        seq.num_computed = seq.prefill_len = 0

    def prefilled(self, seq: Sequence, chunk: PrefillChunk) -> None:
        """A chunk's forward is done (engine, after the step's sync): its tokens are cached in every model.
        Full blocks before the prompt's last token are published for later prompts to share."""
        seq.num_computed = chunk.end
        for key in seq.model_keys:
            self.kv_of(key).publish(seq.row, seq.token_ids, min(chunk.end, seq.num_prompt_tokens - 1))
        if chunk.final:
            self.version += 1  # it decodes from the next step

    # -- the policy ----------------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        decode = self.decoding
        preempted = self._make_room_for_decode() if decode else []
        if preempted:
            decode = self.decoding  # without the preempted rows
        chunks = self._prefill_chunks(self.max_num_batched_tokens - len(decode))
        if not chunks and self.jobs and (not decode or self._score_turn):
            self._score_turn = False
            return ScheduledBatch(StepKind.SCORE, [], preempted=tuple(preempted), job=self.jobs[0])
        self._score_turn = bool(self.jobs)
        if not decode and not chunks:
            return ScheduledBatch(StepKind.IDLE, [], preempted=tuple(preempted))
        kind = StepKind.MIXED if decode and chunks else StepKind.DECODE if decode else StepKind.PREFILL
        return ScheduledBatch(kind, decode, preempted=tuple(preempted), prefill=tuple(chunks))

    def _prefill_chunks(self, budget: int) -> list[PrefillChunk]:
        """Prompt work within `budget` tokens: admitted prompts' next chunks, then waiting prompts.

        At least one token of prompt work is scheduled when any is pending (the budget may be used up by
        decode rows), so a prompt always progresses; without chunking a prompt longer than the budget
        runs whole when it is the step's first. `Engine.validate` refused what could never fit in the KV
        cache.
        """
        chunks: list[PrefillChunk] = []
        budget = max(budget, 1)

        def whole(seq: Sequence) -> bool:
            # Echo prompts are never split: their prompt log-probs come from one full forward.
            return not self.chunked_prefill or seq.wants_prompt_logprobs

        def take(seq: Sequence, start: dict[str | None, int]) -> int:
            remaining = seq.prefill_len - seq.num_computed
            n = remaining if whole(seq) else min(remaining, budget)
            if seq.context_routed and not seq.wants_prompt_logprobs:
                n = min(n, CONTEXT_CHUNK_TOKENS)
            end = seq.num_computed + n
            chunks.append(PrefillChunk(seq, start, end))
            self.caches.chunk_scheduled(seq, start, end)  # a model whose hit ended past the chunk keeps it
            return n

        for seq in self.running:
            if not seq.in_prefill:
                continue
            if budget <= 0:
                return chunks
            budget -= take(seq, self.caches.lengths(seq))
        while self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
            seq = self.waiting[0]
            n = len(seq.token_ids)
            hits = self._lookup(seq)
            computed = min(len(p) * self.kv_of(k).block_size for k, p in hits.items())
            if whole(seq) and chunks and n - computed > budget:
                break
            reserve = 0 if not self.running else self._watermark
            if self._cost(seq, hits, n + 1) + reserve > self.pool.num_free:
                break
            self.waiting.popleft()
            self._take_slot(seq, hits)
            seq.status = Status.RUNNING
            self.running.append(seq)
            start = {k: len(p) * self.kv_of(k).block_size for k, p in hits.items()}
            budget -= take(seq, start)
        return chunks

    def _running_by_model(self) -> Iterator[tuple[ModelKV, list[Sequence], np.ndarray]]:
        """Per model in use: its KV view, the running rows that use it, and their slots."""
        decoding = self.decoding
        by_key: dict[str | None, list[Sequence]] = {None: decoding}
        for seq in decoding:
            for name in seq.memory_names:
                by_key.setdefault(name, []).append(seq)
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
            for kv, seqs, slots in self._running_by_model() if seqs
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
            missing = self.caches.pages_missing(seq)
            if missing > self.pool.num_free:
                self._trim_lookahead()  # spare draft pages go before anyone is preempted
            while missing > self.pool.num_free and self.running[-1] is not seq:
                preempted.append(self._preempt(self.running[-1]))
            if missing > self.pool.num_free:  # it is the last one left that could give pages back
                preempted.append(self._preempt(seq))
                continue
            self.caches.reserve(seq)
            i += 1
        if self.decoding:
            self._room, self._room_version = self._steps_of_room() - 1, self.version  # this step takes one
        return preempted

    def reserve_lookahead(self, seq: Sequence, num_tokens: int) -> bool:
        """Pages for `num_tokens` more tokens of a running row in every model it uses (a speculative round
        caches its drafts), only from free pages above the watermark: speculation never preempts anyone.
        Returns whether the row has them. They stay with the row for its later rounds, until it finishes
        or another row needs a page and none is free (`_trim_lookahead`)."""
        missing = self.caches.pages_missing(seq, num_tokens)
        if missing and missing + self._watermark > self.pool.num_free:
            return False
        self.caches.reserve(seq, num_tokens)
        return True

    def _trim_lookahead(self) -> None:
        """Every running row keeps only the pages its next token needs, in every model."""
        self.caches.trim_lookahead(self.decoding)

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

