"""Batched forwards of the base and the memories, each with its own KV cache.

On CUDA the base runs on the current stream and the memories on a side stream, so the two overlap;
the streams are joined (event waits, no host sync) before the logits are mixed. On CPU the forwards
run one after the other. Failures are contained per model: a memory that raises fails only the
sequences that use it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from server.kv import BatchCache, cache_kwarg, prefill_inputs
from server.loader import LoadedModel
from server.sequence import Sequence


class _Timer:
    """Wall clock on CPU; CUDA events on GPU, read only after the step's own synchronisation."""

    def __init__(self, device: torch.device, stream: torch.cuda.Stream | None = None) -> None:
        self.cuda = device.type == "cuda"
        self.stream = stream
        self.total = 0.0
        self._pairs: list = []

    def __enter__(self) -> _Timer:
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record(self.stream)
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record(self.stream)
            self._pairs.append((self._start, end))
        else:
            self.total += time.perf_counter() - self._t0

    def seconds(self) -> float:
        return self.total + sum(s.elapsed_time(e) for s, e in self._pairs) / 1000.0


@dataclass
class MemoryLogits:
    rows: list[int]  # indices into the step's sequence list
    logits: torch.Tensor  # [len(rows), V] last-position logits, cut to the vocabulary
    prompt: dict[int, torch.Tensor] = field(default_factory=dict)  # row -> [T, V] for echo rows


@dataclass
class StepLogits:
    base: torch.Tensor  # [B, V] last-position logits, cut to the vocabulary
    memories: list[MemoryLogits]
    prompt: dict[int, torch.Tensor]  # row -> [T, V] base logits over the prompt, for echo rows
    failed: dict[int, str]  # row -> error message
    timers: tuple[_Timer, _Timer]  # base, memories

    def forward_seconds(self) -> dict[str, float]:
        """Per-phase device time; on CUDA call it only after the step's host sync (events are done)."""
        return {"base_forward": self.timers[0].seconds(), "memory_forward": self.timers[1].seconds()}


class ModelRunner:
    def __init__(self, base: LoadedModel, use_streams: bool = True) -> None:
        self.base = base
        self.device = base.device
        self.base_cache = BatchCache()
        self.mem_caches: dict[int, BatchCache] = {}  # id(LoadedModel) -> cache
        self.side_stream = torch.cuda.Stream(self.device) if use_streams and self.device.type == "cuda" else None
        self._kw: dict[int, str] = {}
        self.pad_id = next(iter(sorted(base.eos_token_ids)), 0)

    # -- bookkeeping -------------------------------------------------------------------------------
    def _cache_kw(self, lm: LoadedModel) -> str:
        key = id(lm)
        if key not in self._kw:
            self._kw[key] = cache_kwarg(lm.model)
        return self._kw[key]

    def free(self, seqs: list[Sequence]) -> None:
        ids = {s.seq_id for s in seqs}
        self.base_cache.remove(ids)
        for key in list(self.mem_caches):
            self.mem_caches[key].remove(ids)
            if not self.mem_caches[key]:
                del self.mem_caches[key]
                self._kw.pop(key, None)

    def reset(self) -> None:
        self.base_cache = BatchCache()
        self.mem_caches.clear()

    # -- forwards ----------------------------------------------------------------------------------
    def _prefill_model(self, lm: LoadedModel, seqs: list[Sequence], full: bool) -> tuple[torch.Tensor, DynamicCache]:
        """One left-padded forward over whole prompts. Returns logits [B, T or 1, V] and the cache."""
        ids, mask, pos = prefill_inputs([s.token_ids for s in seqs], self.pad_id, self.device)
        cache = DynamicCache()
        out = lm.model(
            input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
            logits_to_keep=0 if full else 1, **{self._cache_kw(lm): cache},
        )
        return out.logits[..., : self.base.vocab_size], cache  # [B, T|1, V]

    def _prefill_group(self, lm: LoadedModel, cache: BatchCache, seqs: list[Sequence], rows: list[int]):
        """Batched prefill for plain rows; echo rows (needing every position's logits) one by one."""
        last = torch.empty(len(seqs), self.base.vocab_size, device=self.device, dtype=lm.dtype)
        prompt: dict[int, torch.Tensor] = {}
        plain = [i for i, s in enumerate(seqs) if s.params.prompt_logprobs is None]
        echo = [i for i, s in enumerate(seqs) if s.params.prompt_logprobs is not None]
        pending: list[tuple[list[int], DynamicCache]] = []
        if plain:
            logits, kv = self._prefill_model(lm, [seqs[i] for i in plain], full=False)
            last[plain] = logits[:, -1]
            pending.append((plain, kv))
        for i in echo:
            logits, kv = self._prefill_model(lm, [seqs[i]], full=True)
            last[i] = logits[0, -1]
            prompt[rows[i]] = logits[0]
            pending.append(([i], kv))
        # Merge only after every forward succeeded, so a failure leaves the running cache intact.
        for idx, kv in pending:
            cache.add([seqs[i].seq_id for i in idx], kv, [len(seqs[i].token_ids) for i in idx])
        return last, prompt

    def _decode_model(self, lm: LoadedModel, cache: BatchCache, by_id: dict[int, Sequence]) -> torch.Tensor:
        ids = torch.tensor([[by_id[s].last_token] for s in cache.seq_ids], device=self.device)  # [B, 1]
        mask, pos = cache.decode_inputs(self.device)
        out = lm.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **{self._cache_kw(lm): cache.cache})
        cache.advance()
        return out.logits[:, -1, : self.base.vocab_size]  # [B, V]

    def _memory_groups(self, seqs: list[Sequence]) -> dict[int, tuple[LoadedModel, list[int]]]:
        groups: dict[int, tuple[LoadedModel, list[int]]] = {}
        for i, s in enumerate(seqs):
            if s.memory is not None:
                groups.setdefault(id(s.memory), (s.memory, []))[1].append(i)
        return groups

    def run(self, seqs: list[Sequence], is_prefill: bool) -> StepLogits:
        """schedule is done: run the base over all `seqs` and each memory over its own rows."""
        groups = self._memory_groups(seqs)
        by_id = {s.seq_id: s for s in seqs}
        failed: dict[int, str] = {}
        mem_out: list[MemoryLogits] = []
        base_timer = _Timer(self.device)
        mem_timer = _Timer(self.device, self.side_stream)

        def run_memories() -> None:
            for key, (lm, rows) in groups.items():
                try:
                    with mem_timer:
                        cache = self.mem_caches.setdefault(key, BatchCache())
                        if is_prefill:
                            logits, prompt = self._prefill_group(lm, cache, [seqs[i] for i in rows], rows)
                            mem_out.append(MemoryLogits(rows, logits, prompt))
                        else:
                            logits = self._decode_model(lm, cache, by_id)
                            order = [cache.row_of(seqs[i].seq_id) for i in rows]
                            mem_out.append(MemoryLogits(rows, logits[order]))
                except Exception as exc:  # contained: only this memory's sequences fail
                    for i in rows:
                        failed[i] = f"memory forward failed: {type(exc).__name__}: {exc}"
                    if not is_prefill:
                        self.mem_caches.pop(key, None)  # possibly half-appended: its rows all fail anyway

        base_logits: torch.Tensor | None = None
        prompt: dict[int, torch.Tensor] = {}

        def run_base() -> None:
            nonlocal base_logits, prompt
            with base_timer:
                if is_prefill:
                    base_logits, prompt = self._prefill_group(self.base, self.base_cache, seqs, list(range(len(seqs))))
                else:
                    logits = self._decode_model(self.base, self.base_cache, by_id)
                    order = [self.base_cache.row_of(s.seq_id) for s in seqs]
                    base_logits = logits[order]

        self._parallel(run_base, run_memories)
        assert base_logits is not None
        return StepLogits(base_logits, mem_out, prompt, failed, (base_timer, mem_timer))

    def _parallel(self, run_base: Callable[[], None], run_memories: Callable[[], None]) -> None:
        if self.side_stream is None:
            run_base()
            run_memories()
            return
        main = torch.cuda.current_stream(self.device)
        # The side stream must see this step's inputs (and the previous step's frees) before it starts.
        self.side_stream.wait_stream(main)
        with torch.cuda.stream(self.side_stream):
            run_memories()  # enqueues kernels and returns: overlaps with the base below
        run_base()
        main.wait_stream(self.side_stream)  # mixing reads the memory logits
