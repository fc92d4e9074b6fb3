"""One model's decode (and verify) step at fixed shapes: CUDA graphs on a GPU, the same static-buffer
function elsewhere.

A decode forward's shapes are (batch bucket, blocks attended). Batches are rounded up to 1, 2, 4,
then multiples of 8 (as vLLM) and the rows past the real batch are padding rows on the dummy slot;
with graphs, attended blocks are rounded up to powers of two from 256 tokens. Each (batch, blocks)
pair is captured once, at start-up for the base and when a memory is loaded. A replay costs one
launch instead of ~1,000, which is what lets the memory's step hide under the base's on a second stream.

Without CUDA graphs (CPU, `--enforce-eager`) `run` calls exactly the function that would be
captured, on the same padded static buffers, so CPU tests exercise the captured code; only the
attended blocks are exact, since nothing needs them to take few values and attention costs what it reads.

`VerifyGraphs` is the same for speculative mixing's verify forward of the base: T = K + 1 tokens per
row (`verify_forward`). Graphs are captured at T = K + 1 and rows drafting fewer tokens pad; eagerly the
forward runs at the round's own T.
"""

from __future__ import annotations

import logging
import time

import torch

from server.attention import DecodeContext, VerifyContext
from server.kv import ModelKV
from server.loader import LoadedModel

log = logging.getLogger(__name__)

MIN_ATTENDED_TOKENS = 256


def batch_buckets(max_num_seqs: int) -> list[int]:
    sizes = [b for b in (1, 2, 4) if b < max_num_seqs] + list(range(8, max_num_seqs, 8))
    return [*sizes, max_num_seqs]


def block_buckets(kv: ModelKV) -> list[int]:
    """Numbers of blocks a decode step attends over: powers of two from MIN_ATTENDED_TOKENS, then all."""
    first = max(1, -(-MIN_ATTENDED_TOKENS // kv.block_size))
    sizes = []
    n = first
    while n < kv.max_blocks:
        sizes.append(n)
        n *= 2
    return [*sizes, kv.max_blocks]


def _bucket(sizes: list[int], n: int) -> int:
    return next(s for s in sizes if s >= n)


def decode_forward(lm: LoadedModel, kv: ModelKV, tokens: torch.Tensor, slots: torch.Tensor,
                   num_blocks: int) -> torch.Tensor:
    """Logits [Bb, V] of each slot's next token. Everything is a device op: this is what a graph captures.

    tokens: [S+1] each slot's last sampled token; slots: [Bb] rows of this step (padding = dummy slot).
    """
    pos = kv.lengths[slots]  # [Bb] tokens already cached = position of the new token
    block = torch.div(pos, kv.block_size, rounding_mode="floor")  # [Bb]
    ctx = DecodeContext(
        kv,
        page=kv.tables[slots, block],  # [Bb]
        offset=pos - block * kv.block_size,  # [Bb]
        tables=kv.tables[slots, :num_blocks],  # [Bb, nblk]
        lengths=pos + 1,  # [Bb]
    )
    out = lm.model(
        input_ids=tokens[slots].unsqueeze(1),  # [Bb, 1]
        position_ids=pos.unsqueeze(1),  # [Bb, 1]
        attention_mask=ctx.attention_mask,
        use_cache=False,
        logits_to_keep=1,
        memdec_ctx=ctx,
    )
    return out.logits[:, -1, : lm.vocab_size]  # [Bb, V]


class DecodeGraphs:
    """The decode step of one model: static input buffer, bucket choice, captured graphs or eager calls."""

    def __init__(self, lm: LoadedModel, kv: ModelKV, tokens: torch.Tensor, max_num_seqs: int,
                 use_graphs: bool) -> None:
        self.lm = lm
        self.kv = kv
        self.tokens = tokens
        self.use_graphs = use_graphs and kv.pool.device.type == "cuda"
        self.batch_sizes = batch_buckets(max_num_seqs)
        self.block_sizes = block_buckets(kv) if self.use_graphs else list(range(1, kv.max_blocks + 1))
        # The graph's input: which slots this step runs; rows past the batch stay on the dummy slot.
        self.slots = torch.full((self.batch_sizes[-1],), kv.dummy_slot, dtype=torch.long,
                                device=kv.pool.device)
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._current: tuple[torch.Tensor, int] | None = None  # (slots tensor, rows) the buffer holds now

    def capture(self) -> float:
        """Capture every (batch, blocks) bucket; returns the seconds it took (0 without graphs)."""
        if not self.use_graphs:
            return 0.0
        t0 = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()  # shared by this model's graphs, which never run concurrently
        stream = torch.cuda.Stream(self.kv.pool.device)
        self.slots.fill_(self.kv.dummy_slot)
        self._current = None
        # Largest first, so smaller graphs reuse the pool's blocks.
        for bb in reversed(self.batch_sizes):
            for nb in reversed(self.block_sizes):
                with torch.cuda.stream(stream):
                    decode_forward(self.lm, self.kv, self.tokens, self.slots[:bb], nb)  # warm-up: lazy inits
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    out = decode_forward(self.lm, self.kv, self.tokens, self.slots[:bb], nb)
                self._graphs[(bb, nb)] = (graph, out)
        torch.cuda.current_stream(self.kv.pool.device).wait_stream(stream)
        return time.perf_counter() - t0

    def release(self) -> None:
        self._graphs.clear()

    def run(self, slots: torch.Tensor, rows: int, max_tokens: int) -> torch.Tensor:
        """Logits [rows, V]. slots: [rows] on the device; max_tokens: the longest row's length after this
        step."""
        bb = _bucket(self.batch_sizes, rows)
        nb = _bucket(self.block_sizes, self.kv.blocks_for(max_tokens))
        if self._current is None or self._current[0] is not slots or self._current[1] != bb:
            self.slots[:rows].copy_(slots)
            self.slots[rows:].fill_(self.kv.dummy_slot)
            self._current = (slots, bb)
        captured = self._graphs.get((bb, nb))
        if captured is None:
            return decode_forward(self.lm, self.kv, self.tokens, self.slots[:bb], nb)[:rows]
        graph, out = captured
        graph.replay()
        return out[:rows]


def verify_forward(
    lm: LoadedModel, kv: ModelKV, ids: torch.Tensor, slots: torch.Tensor, valid: torch.Tensor, num_blocks: int
) -> torch.Tensor:
    """Logits [Bb, T, V] of T tokens per row on top of each row's cache. Device ops only (a graph captures
    it).

    ids: [Bb, T] the row's last token then its drafts; slots: [Bb] (padding = dummy slot); valid: [Bb]
    real tokens per row (the rest write to the scratch page, see `VerifyContext`).
    """
    t = ids.shape[1]
    start = kv.lengths[slots]  # [Bb] tokens cached = position of token 0
    steps = torch.arange(t, device=ids.device)  # [T]
    pos = start[:, None] + steps  # [Bb, T]
    real = steps[None, :] < valid[:, None]  # [Bb, T]
    # Invalid tokens may lie past the row's pages (or its table): point them at this model's scratch page.
    block = torch.where(real, torch.div(pos, kv.block_size, rounding_mode="floor"), 0)  # [Bb, T]
    page = torch.where(real, kv.tables[slots[:, None], block], kv.scratch_page)  # [Bb, T]
    ctx = VerifyContext(
        kv,
        page=page,
        offset=torch.where(real, pos - block * kv.block_size, 0),
        tables=kv.tables[slots, :num_blocks],  # [Bb, nblk]
        start=start,
    )
    out = lm.model(
        input_ids=ids,  # [Bb, T]
        # invalid tokens reuse a real position (GPT-2 has a table)
        position_ids=torch.where(real, pos, start[:, None]),
        attention_mask=ctx.attention_mask,
        use_cache=False,
        logits_to_keep=0,  # every position
        memdec_ctx=ctx,
    )
    return out.logits[..., : lm.vocab_size]  # [Bb, T, V]


class VerifyGraphs:
    """The base's verify forward: static buffers (slots, tokens, valid counts), buckets, graphs or eager
    calls."""

    def __init__(self, lm: LoadedModel, kv: ModelKV, max_num_seqs: int, num_tokens: int,
                 use_graphs: bool) -> None:
        self.lm = lm
        self.kv = kv
        self.num_tokens = num_tokens  # T = K + 1: what graphs are captured at
        self.use_graphs = use_graphs and kv.pool.device.type == "cuda"
        self.batch_sizes = batch_buckets(max_num_seqs)
        self.block_sizes = block_buckets(kv) if self.use_graphs else list(range(1, kv.max_blocks + 1))
        device = kv.pool.device
        rows = self.batch_sizes[-1]
        self.slots = torch.full((rows,), kv.dummy_slot, dtype=torch.long, device=device)
        self.ids = torch.zeros(rows, num_tokens, dtype=torch.long, device=device)
        self.valid = torch.zeros(rows, dtype=torch.long, device=device)
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def capture(self) -> float:
        """Capture every (batch, blocks) bucket at T = K + 1; returns the seconds it took (0 without
        graphs)."""
        if not self.use_graphs:
            return 0.0
        t0 = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.kv.pool.device)
        self.slots.fill_(self.kv.dummy_slot)
        self.valid.zero_()
        for bb in reversed(self.batch_sizes):
            for nb in reversed(self.block_sizes):
                args = (self.lm, self.kv, self.ids[:bb], self.slots[:bb], self.valid[:bb], nb)
                with torch.cuda.stream(stream):
                    verify_forward(*args)  # warm-up: lazy inits
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    out = verify_forward(*args)
                self._graphs[(bb, nb)] = (graph, out)
        torch.cuda.current_stream(self.kv.pool.device).wait_stream(stream)
        return time.perf_counter() - t0

    def release(self) -> None:
        self._graphs.clear()

    def run(self, slots: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor,
            max_tokens: int) -> torch.Tensor:
        """Logits [rows, t, V]. slots, valid: [rows]; ids: [rows, t] with t <= K + 1; max_tokens: the longest
        row's cached length plus t."""
        rows, t = ids.shape
        bb = _bucket(self.batch_sizes, rows)
        nb = _bucket(self.block_sizes, self.kv.blocks_for(max_tokens))
        self.slots[:rows].copy_(slots)
        self.slots[rows:bb].fill_(self.kv.dummy_slot)
        self.valid[:rows].copy_(valid)
        self.valid[rows:bb].zero_()
        captured = self._graphs.get((bb, nb))
        if captured is None:  # eager: the round's own T
            self.ids[:rows, :t].copy_(ids)
            return verify_forward(self.lm, self.kv, self.ids[:bb, :t], self.slots[:bb], self.valid[:bb],
                                  nb)[:rows]
        self.ids[:rows, :t].copy_(ids)
        self.ids[:rows, t:].zero_()
        graph, out = captured
        graph.replay()
        return out[:rows, :t]
