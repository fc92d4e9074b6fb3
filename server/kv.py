"""Paged KV caches: one arena of pages shared by the base and every memory.

Why one arena: a request chooses its memory, memories come and go (hot-swap), and most requests use
one memory or none, so a cache reserved per model would strand memory in caches nobody uses. The
arena is `num_pages` pages of `page_bytes`; a page belongs to one model at a time, which views it as
`block_size` tokens of all its layers' keys and values, `[layers, 2, block_size, kv_heads, head_dim]`.
The base's pages hold `EngineConfig.block_size` tokens; a memory with fewer KV bytes per token fits
more tokens in the same page.

A sequence occupies one *slot* (a row of every table) in each model it uses. Per model and slot the
host keeps a block table (block j of the sequence -> page) and a length; the device keeps the same
tables, updated in place only when something changes: a join, a leave, a row crossing into a new
page. A steady decode step changes nothing here but `advance` (lengths += 1, on the device).

Each model has a scratch page (the base page 0, each memory one taken from the pool): its unused
table entries point to it and the padding rows of a CUDA-graph bucket write into it — its own, so the
base's and a memory's padding rows, running on two streams at once, never write the same bytes. New
pages are zeroed before use (a prompt's as a chunk first reaches them), so positions a row has not
written yet hold zeros rather than another sequence's (possibly non-finite) values: masked positions
still enter attention as 0·value, and 0·inf would be NaN.

Prefix caching (`--enable-prefix-caching`): a *full* block of a prompt is identified by a hash chained
over every token before it and its own (`block_keys`), per model view — the base and each memory
have their own table, and a memory's view is created anew (empty) on every load, so a reloaded or
replaced memory never serves a block computed by another. Pages are reference counted: a cached
block's page may sit in several slots' tables at once (`attach`). When its last reference goes, a
page that holds a published block is not freed but kept, its contents intact, in the pool's LRU of
cached pages; it counts as free (it is handed out again, evicted least recently used first, only
when no never-cached page is left) and a later prompt with the same prefix takes it back. Shared
pages are never written: the first `host_frozen[slot]` blocks of a slot (hits and published
blocks) lie wholly before the slot's last prompt token, and every write — a prefill chunk, a
decode, a verify, a rewrite after a rollback — lands at a position past them (`truncate` checks).
So at any time a page is free, cached-free, a scratch page, or held by exactly its reference count
of (model, slot) pairs of one model.

Reuse of a freed page is safe without events because every engine step ends with a host sync: by
the time the scheduler frees or hands out a page, all kernels of the previous step have finished.

One writer: a running sequence's lengths and pages, in every model it uses, change only through
`SequenceKV`, by event — admitted, a chunk scheduled, a decode scheduled (its page), a lookahead reserved
or trimmed, a decode step run, drafts accepted, rolled back, released — so the invariants above are kept
in one place; the scheduler, the engine and the runner read lengths but never write them.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from transformers import PretrainedConfig

SCRATCH_PAGE = 0
BlockKey = tuple[int, tuple[int, ...]]  # (hash of the previous block's key, this block's tokens)
PAGE_ALIGN = 256  # bytes; keeps every page's start aligned for vectorised copies


@dataclass(frozen=True)
class KVGeometry:
    """What one token costs a model's cache."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def token_bytes(self) -> int:
        return (
            self.num_layers * 2 * self.num_kv_heads * self.head_dim
            * torch.empty((), dtype=self.dtype).element_size()
        )

    @classmethod
    def of(cls, config: PretrainedConfig, dtype: torch.dtype, shards: int = 1) -> KVGeometry:
        """`shards` > 1: one tensor-parallel rank's share, whose attention holds kv_heads / shards heads."""
        cfg = config.get_text_config()
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        if kv_heads % shards:
            raise ValueError(f"{kv_heads} key/value heads do not split over {shards} tensor-parallel ranks")
        return cls(cfg.num_hidden_layers, kv_heads // shards, head_dim, dtype)


class PagePool:
    """The arena and its free pages (host bookkeeping; the device sees pages only through tables)."""

    def __init__(self, num_pages: int, page_bytes: int, device: torch.device) -> None:
        if num_pages < 2:
            raise ValueError(f"the KV cache needs at least 2 pages (one is scratch), got {num_pages}")
        self.num_pages = num_pages
        self.page_bytes = page_bytes
        self.device = device
        # Pages are zeroed when handed out (see the module docstring), so only the scratch page is zeroed
        # here; on a CPU the untouched rest of the arena then costs no resident memory.
        self.arena = torch.empty(num_pages, page_bytes, dtype=torch.uint8, device=device)  # [P, page_bytes]
        self.arena[SCRATCH_PAGE].zero_()  # the base's scratch page; memories take theirs with `take`
        # The same bytes as 8-byte words: zeroing pages through it is one kernel on a GPU and ~7x faster on
        # a CPU than byte-wise (pages are multiples of PAGE_ALIGN bytes).
        self.words = self.arena.view(torch.int64)  # [P, page_bytes / 8]
        self._free = list(range(num_pages - 1, SCRATCH_PAGE, -1))  # pop() hands out low pages first
        self._scratch = 0  # memories' scratch pages taken from the pool
        # Prefix caching: references per page ((model, slot) table entries), and the pages no slot refers to
        # that still hold a published block, least recently used first, each with the view that owns its hash.
        self.refs = np.zeros(num_pages, dtype=np.int64)
        self.cached: OrderedDict[int, ModelKV] = OrderedDict()

    @property
    def num_free(self) -> int:
        """Pages a request can be given: never-cached free pages plus cached ones nobody refers to."""
        return len(self._free) + len(self.cached)

    @property
    def num_usable(self) -> int:
        """Pages sequences can hold: all but the scratch pages."""
        return self.num_pages - 1 - self._scratch

    def take_scratch(self) -> int:
        """A memory's scratch page (see the module docstring), zeroed; it no longer counts as usable."""
        page = self.take(1)[0]
        self.words[page].zero_()
        self._scratch += 1
        return page

    def give_back_scratch(self, page: int) -> None:
        self.give_back([page])
        self._scratch -= 1

    def take(self, n: int) -> list[int]:
        """n pages with one reference each; cached pages are evicted (LRU first) only when free ones run
        out."""
        if n > self.num_free:
            raise MemoryError(f"KV cache: {n} pages asked, {self.num_free} free")
        while len(self._free) < n:
            page, owner = self.cached.popitem(last=False)
            owner.forget(page)
            self._free.append(page)
        pages = [self._free.pop() for _ in range(n)]
        self.refs[pages] = 1
        return pages

    def give_back(self, pages: list[int]) -> None:
        self.refs[pages] = 0
        self._free.extend(reversed(pages))

    def unref(self, pages: list[int], owner: ModelKV) -> None:
        """Drop one reference to each page; at zero it becomes free, or cached-free if it holds a published
        block."""
        for page in pages:
            self.refs[page] -= 1
            if self.refs[page] == 0:
                if owner.is_published(page):
                    self.cached[page] = owner  # most recently used last
                else:
                    self._free.append(page)

    def ref(self, page: int) -> None:
        """One more reference to a page (a prefix-cache hit); a cached-free page leaves the LRU."""
        if self.refs[page] == 0:
            del self.cached[page]
        self.refs[page] += 1

    def uncache(self, owner: ModelKV) -> None:
        """Free every cached page of `owner` (its model is being removed)."""
        for page in [p for p, o in self.cached.items() if o is owner]:
            del self.cached[page]
            owner.forget(page)
            self._free.append(page)


def page_bytes_for(base: KVGeometry, block_size: int) -> int:
    raw = base.token_bytes * block_size
    return -(-raw // PAGE_ALIGN) * PAGE_ALIGN


class ModelKV:
    """One model's view of the arena: per-layer key/value pages, block tables and lengths per slot.

    `num_slots` real slots plus one dummy slot (index `num_slots`) for padding rows: its table points
    at the scratch page and its length stays 0.
    """

    def __init__(
        self, pool: PagePool, geometry: KVGeometry, num_slots: int, max_model_len: int, scratch_page: int,
        prefix_caching: bool = False,
    ) -> None:
        g = geometry
        if g.token_bytes > pool.page_bytes:
            raise ValueError(
                f"a token of this model needs {g.token_bytes} KV bytes, "
                f"more than a whole page ({pool.page_bytes}); raise --block-size"
            )
        self.pool = pool
        self.geometry = g
        self.block_size = pool.page_bytes // g.token_bytes  # tokens per page for this model
        self.max_blocks = -(-max_model_len // self.block_size)
        self.num_slots = num_slots
        self.dummy_slot = num_slots
        self.scratch_page = scratch_page
        used = self.block_size * g.token_bytes
        # [P, layers, 2, block, kv_heads, head_dim]: a strided view of the arena (page stride = page_bytes).
        view = pool.arena[:, :used].view(g.dtype).unflatten(
            1, (g.num_layers, 2, self.block_size, g.num_kv_heads, g.head_dim)
        )
        # each [P, block, kv_heads, head_dim]
        self.keys = [view[:, layer, 0] for layer in range(g.num_layers)]
        self.values = [view[:, layer, 1] for layer in range(g.num_layers)]
        device = pool.device
        rows = num_slots + 1
        # [S+1, blocks]
        self.tables = torch.full((rows, self.max_blocks), scratch_page, dtype=torch.long, device=device)
        self.lengths = torch.zeros(rows, dtype=torch.long, device=device)  # [S+1] tokens cached per slot
        self.host_tables = np.full((rows, self.max_blocks), scratch_page, dtype=np.int64)
        self.host_lengths = np.zeros(rows, dtype=np.int64)
        self.host_blocks = np.zeros(rows, dtype=np.int64)  # pages held per slot
        # Prefix caching. Leading blocks of a slot that are shared or published: never written again.
        self.prefix_caching = prefix_caching
        self.host_frozen = np.zeros(rows, dtype=np.int64)
        self._page_of: dict[BlockKey, int] = {}  # block key -> page holding that block (this model only)
        self._hash_of: dict[int, BlockKey] = {}  # page -> the block key it was published under
        # Changes the device has not seen yet; `flush` applies them in one upload.
        self._table_updates: list[tuple[int, int, int]] = []  # (slot, block, page)
        self._length_updates: dict[int, int] = {}
        self._new_pages: list[int] = []
        # Pages reserved for a prompt are zeroed when a chunk first reaches them (`set_length`), not at
        # admission: a long prompt's pages are then zeroed (and, on a CPU, first touched) chunk by chunk, so
        # the admission step of a chunked prompt costs no more than its other steps. First block not yet
        # zeroed, per slot.
        self._lazy_from = np.full(rows, self.max_blocks, dtype=np.int64)  # max_blocks: none

    # -- host bookkeeping (the scheduler's view) ---------------------------------------------------
    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def pages_missing(self, slot: int, num_tokens: int) -> int:
        """Pages `slot` still needs to hold `num_tokens` tokens."""
        return max(0, self.blocks_for(num_tokens) - int(self.host_blocks[slot]))

    def reserve(self, slot: int, num_tokens: int, lazy: bool = False) -> None:
        """Give `slot` pages for `num_tokens` tokens (the caller checked that enough are free). `lazy`: zero
        them only as the slot's length reaches them (a prompt's pages, filled chunk by chunk)."""
        missing = self.pages_missing(slot, num_tokens)
        if not missing:
            return
        first = int(self.host_blocks[slot])
        pages = self.pool.take(missing)
        for j, page in enumerate(pages, start=first):
            self.host_tables[slot, j] = page
            self._table_updates.append((slot, j, page))
        self.host_blocks[slot] = first + missing
        if lazy:
            self._lazy_from[slot] = min(int(self._lazy_from[slot]), first)
        else:
            self._new_pages.extend(pages)

    def set_length(self, slot: int, num_tokens: int) -> None:
        """The slot holds `num_tokens` tokens (or is about to: a chunk's length is set before its forward,
        which reads every page up to it, so lazily reserved pages up to it are zeroed by the next flush)."""
        self.host_lengths[slot] = num_tokens
        self._length_updates[slot] = num_tokens
        lazy = int(self._lazy_from[slot])
        if lazy < self.max_blocks:
            need = min(self.blocks_for(num_tokens), int(self.host_blocks[slot]))
            if need > lazy:
                self._new_pages.extend(int(p) for p in self.host_tables[slot, lazy:need])
                self._lazy_from[slot] = need if need < self.host_blocks[slot] else self.max_blocks

    def truncate(self, slot: int, num_tokens: int) -> None:
        """Roll `slot` back to its first `num_tokens` tokens: O(1) plus the pages it gives back."""
        if num_tokens > self.host_lengths[slot]:
            raise ValueError(
                f"cannot truncate slot {slot} to {num_tokens} tokens: it holds {self.host_lengths[slot]}"
            )
        if num_tokens < self.host_frozen[slot] * self.block_size:
            # A rollback never reaches into the prompt's last token, and frozen blocks end before it.
            raise ValueError(
                f"cannot truncate slot {slot} into its shared prefix ({self.host_frozen[slot]} blocks)"
            )
        keep = self.blocks_for(num_tokens)
        self._release_blocks(slot, keep)
        self.set_length(slot, num_tokens)

    def trim(self, slot: int, num_tokens: int) -> None:
        """Give back the pages `slot` holds past what `num_tokens` tokens need (a speculative row's spare
        draft pages); its length is unchanged."""
        self._release_blocks(slot, self.blocks_for(num_tokens))

    def free(self, slot: int) -> None:
        self._release_blocks(slot, 0)
        self.host_frozen[slot] = 0
        self.set_length(slot, 0)

    def _release_blocks(self, slot: int, keep: int) -> None:
        held = int(self.host_blocks[slot])
        if held <= keep:
            return
        pages = [int(p) for p in self.host_tables[slot, keep:held]]
        if self._lazy_from[slot] >= keep:  # no page left unzeroed (released ones are zeroed when taken again)
            self._lazy_from[slot] = self.max_blocks
        # Last block first: a prefix's later blocks become least recently used before its earlier ones, so an
        # eviction shortens a cached prefix from its end (every continuation needs its start), as vLLM does.
        self.pool.unref(pages[::-1], self)
        self.host_tables[slot, keep:held] = self.scratch_page
        self._table_updates.extend((slot, j, self.scratch_page) for j in range(keep, held))
        self.host_blocks[slot] = keep

    # -- prefix caching ----------------------------------------------------------------------------
    def block_keys(self, tokens: Sequence[int], num_blocks: int) -> list[BlockKey]:
        """Keys of the first `num_blocks` full blocks of `tokens`: (hash of the previous block's key, own
        tokens).

        A block's keys and values depend on every token up to its end and on nothing else (positions are
        implied by the block's index), so two prompts agreeing on a block's key agree on its contents.
        Lookups compare the block's own tokens exactly; only a collision of the 64-bit parent hash
        (2^-64 per pair) could reuse a wrong block, as with vLLM's default (builtin) hash.
        """
        keys: list[BlockKey] = []
        parent, n = 0, self.block_size
        for j in range(num_blocks):
            keys.append((parent, tuple(tokens[j * n : (j + 1) * n])))
            parent = hash(keys[-1])
        return keys

    def match(self, tokens: Sequence[int], max_blocks: int) -> list[int]:
        """Pages of the longest run of cached leading blocks of `tokens`, at most `max_blocks` (no side
        effects)."""
        if not self.prefix_caching or max_blocks <= 0:
            return []
        pages = []
        for h in self.block_keys(tokens, max_blocks):
            page = self._page_of.get(h)
            if page is None:
                break
            pages.append(page)
        return pages

    def attach(self, slot: int, pages: list[int]) -> None:
        """Start an empty slot's table with cached pages (a prefix hit): shared, frozen, nothing to zero."""
        assert self.host_blocks[slot] == 0, "hits start a slot's table"
        for j, page in enumerate(pages):
            self.pool.ref(page)
            self.host_tables[slot, j] = page
            self._table_updates.append((slot, j, page))
        self.host_blocks[slot] = self.host_frozen[slot] = len(pages)

    def publish(self, slot: int, tokens: Sequence[int], num_tokens: int) -> None:
        """Make the full blocks among the slot's first `num_tokens` tokens (computed, and never to be written
        again) available to later prompts. A block another slot already published stays private here."""
        if not self.prefix_caching:
            return
        blocks = num_tokens // self.block_size
        start = int(self.host_frozen[slot])
        if blocks <= start:
            return
        for j, h in enumerate(self.block_keys(tokens, blocks)):
            if j < start:
                continue
            page = int(self.host_tables[slot, j])
            if h not in self._page_of and page not in self._hash_of:
                self._page_of[h] = page
                self._hash_of[page] = h
        self.host_frozen[slot] = blocks

    def is_published(self, page: int) -> bool:
        return page in self._hash_of

    def forget(self, page: int) -> None:
        """The pool evicted this page: its block is no longer cached."""
        h = self._hash_of.pop(page)
        del self._page_of[h]

    def drop_cache(self) -> None:
        """The model is going away: its cached-free pages return to the pool."""
        self.pool.uncache(self)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._hash_of)

    def advance_host(self, slots: list[int]) -> None:
        self.host_lengths[slots] += 1

    # -- device ----------------------------------------------------------------------------------
    def flush(self, upload: Callable[[np.ndarray], torch.Tensor]) -> None:
        """Apply pending table, length and new-page changes on the device (uploads, no host sync)."""
        if self._new_pages:
            pages = upload(np.asarray(self._new_pages, dtype=np.int64))
            self.pool.words.index_fill_(0, pages, 0)
            self._new_pages = []
        if self._table_updates:
            t = upload(np.asarray(self._table_updates, dtype=np.int64).T.copy())  # [3, n]
            self.tables.index_put_((t[0], t[1]), t[2])
            self._table_updates = []
        if self._length_updates:
            items = np.asarray(list(self._length_updates.items()), dtype=np.int64).T.copy()  # [2, n]
            t = upload(items)
            self.lengths.index_put_((t[0],), t[1])
            self._length_updates = {}

    def advance(self, slots: torch.Tensor) -> None:
        """lengths[slots] += 1 on the device (a decode step appended one token to each row)."""
        self.lengths.index_add_(0, slots, torch.ones_like(slots))

    def pages_held(self) -> list[int]:
        """Every page this model's slots hold (host view), for bookkeeping checks."""
        return [
            int(p)
            for slot in range(self.num_slots)
            for p in self.host_tables[slot, : self.host_blocks[slot]]
        ]

    def pending_updates(self) -> tuple[list[int], list[tuple[int, int, int]], dict[int, int]]:
        """What the next `flush` applies (new pages, table entries, lengths): under tensor parallelism rank 0
        sends them to the other ranks, whose caches mirror the base's tables (`queue_updates`)."""
        return list(self._new_pages), list(self._table_updates), dict(self._length_updates)

    def queue_updates(
        self, new_pages: list[int], table_updates: list[tuple[int, int, int]], lengths: dict[int, int]
    ) -> None:
        """Another rank's `pending_updates`, to apply with `flush` (a tensor-parallel rank's base cache)."""
        self._new_pages.extend(new_pages)
        self._table_updates.extend(table_updates)
        self._length_updates.update(lengths)

    @property
    def pending(self) -> bool:
        return bool(self._new_pages or self._table_updates or self._length_updates)


class CacheUser(Protocol):
    """What `SequenceKV` needs of a sequence: its slot, its models (None: the base) and its tokens."""

    @property
    def row(self) -> int: ...
    @property
    def model_keys(self) -> tuple[str | None, ...]: ...
    @property
    def token_ids(self) -> list[int]: ...


class SequenceKV:
    """The one writer of running sequences' cache lengths and pages, in every model each uses (`ModelKV`s
    by key: None is the base, a memory by name), each change named by the event that makes it."""

    def __init__(self, kv_of: Callable[[str | None], ModelKV]) -> None:
        self.kv_of = kv_of

    def lengths(self, seq: CacheUser) -> dict[str | None, int]:
        """Tokens each of its models has cached."""
        return {k: int(self.kv_of(k).host_lengths[seq.row]) for k in seq.model_keys}

    def admit(self, seq: CacheUser, hits: dict[str | None, list[int]]) -> dict[str | None, int]:
        """A sequence takes its slot: its prefix-cache hits, and pages for its tokens (zeroed chunk by chunk,
        `ModelKV.set_length`). Returns the tokens each model has cached (its hits)."""
        # Every model's hits first: a `reserve` may evict cached-free pages, and must not take another model's
        # hits (matched, not yet referenced) from under it.
        for key in seq.model_keys:
            self.kv_of(key).attach(seq.row, hits[key])
        cached = {}
        for key in seq.model_keys:
            kv = self.kv_of(key)
            kv.reserve(seq.row, len(seq.token_ids), lazy=True)
            cached[key] = len(hits[key]) * kv.block_size
            kv.set_length(seq.row, cached[key])
        return cached

    def chunk_scheduled(self, seq: CacheUser, start: dict[str | None, int], end: int) -> None:
        """A prompt chunk up to `end` runs this step: each model holds it (or more: a hit that ended past
        it)."""
        for key, cached in start.items():
            self.kv_of(key).set_length(seq.row, max(cached, end))

    def decode_segment(self, seq: CacheUser) -> dict[str | None, int]:
        """A decode row runs as a one-token segment of a packed forward (a mixed step): every model counts
        its last token as cached from now. Returns the lengths before (the segment's start)."""
        start = self.lengths(seq)
        for key in seq.model_keys:
            self.kv_of(key).set_length(seq.row, len(seq.token_ids))
        return start

    def pages_missing(self, seq: CacheUser, extra: int = 0) -> int:
        """Pages its models still need for its next token and `extra` more (a lookahead's drafts)."""
        return sum(
            kv.pages_missing(seq.row, int(kv.host_lengths[seq.row]) + 1 + extra)
            for kv in map(self.kv_of, seq.model_keys)
        )

    def reserve(self, seq: CacheUser, extra: int = 0) -> None:
        """A decode is scheduled (extra 0: its next token's page) or a lookahead of `extra` drafts reserved:
        every model gets the pages (the caller checked `pages_missing` against the free pages)."""
        for kv in map(self.kv_of, seq.model_keys):
            kv.reserve(seq.row, int(kv.host_lengths[seq.row]) + 1 + extra)

    def trim_lookahead(self, seqs: Sequence[CacheUser]) -> None:
        """Every row keeps only the pages its next token needs (its spare draft pages go back), model by
        model."""
        keys = list(dict.fromkeys(k for seq in seqs for k in seq.model_keys))
        for key in keys:
            kv = self.kv_of(key)
            for seq in seqs:
                if key in seq.model_keys:
                    kv.trim(seq.row, int(kv.host_lengths[seq.row]) + 1)

    def decoded(self, key: str | None, slots: list[int], slots_dev: torch.Tensor) -> None:
        """One model ran a decode step for these slots: each cached one more token (device and host)."""
        kv = self.kv_of(key)
        kv.advance(slots_dev)
        kv.advance_host(slots)

    def mirrored_decode(self, slots_dev: torch.Tensor) -> None:
        """A tensor-parallel worker ran rank 0's decode step on its share of the base: its device lengths
        follow rank 0's (its host lengths are unused: each operation rank 0 sends carries the bounds it
        needs)."""
        self.kv_of(None).advance(slots_dev)

    def accepted(self, seq: CacheUser, num_tokens: int) -> None:
        """After a speculative round, or a forward that failed before anything was cached: every cache of the
        row holds its first `num_tokens` tokens (pages past them stay, for its next round: they hold only its
        own rejected drafts, masked by the length)."""
        for key in seq.model_keys:
            self.kv_of(key).set_length(seq.row, num_tokens)

    def rollback(self, seq: CacheUser, num_tokens: int) -> None:
        """Forget everything past its first `num_tokens` tokens in every cache, and the pages past them."""
        for key in seq.model_keys:
            self.kv_of(key).truncate(seq.row, num_tokens)

    def release(self, seq: CacheUser) -> None:
        """It finished, failed or was preempted: every page of its slot goes back."""
        for key in seq.model_keys:
            self.kv_of(key).free(seq.row)


def num_pages_for_budget(budget_bytes: int, page_bytes: int) -> int:
    return max(0, math.floor(budget_bytes / page_bytes))
