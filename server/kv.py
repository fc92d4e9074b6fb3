"""One model's KV cache for a changing set of sequences.

Scheme: a Hugging Face `DynamicCache` whose rows are right-aligned — row b's cached tokens occupy the
last `lengths[b]` columns, earlier columns are zero padding hidden by the attention mask — and decode
passes explicit per-row `position_ids`. This is the layout HF's own left-padded batch generation
uses, so every HF causal LM (GPT-2's absolute positions, Llama/Qwen2 RoPE) runs unmodified. Rows
are re-packed only when the set changes (a prefill joins, a sequence leaves); a steady decode step
touches nothing but the model's own append. Padding is trimmed whenever the longest row leaves.

HF's `DynamicLayer` appends with `torch.cat`, re-allocating and copying the whole layer every step
(O(cached tokens) memory traffic per token). Our layers keep spare columns and write the new token
in place, growing by doubling: amortised O(1) per step, the same tensors handed to attention.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer


def cache_kwarg(model: PreTrainedModel) -> str:
    """transformers renamed `past_key_values` to `cache` in late 5.x; pass whichever forward takes."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class GrowableLayer(DynamicLayer):
    """A cache layer whose keys/values are views of a buffer with spare columns."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.device = keys.device
        self.is_initialized = True
        self._reserve(keys, values, spare=max(16, keys.shape[-2] // 4))

    def _reserve(self, keys: torch.Tensor, values: torch.Tensor, spare: int) -> None:
        b, h, w, _ = keys.shape
        self._k = keys.new_empty(b, h, w + spare, keys.shape[-1])  # [B, H, capacity, D]
        self._v = values.new_empty(b, h, w + spare, values.shape[-1])
        self._k[:, :, :w] = keys
        self._v[:, :, :w] = values
        self._len = w
        self.keys, self.values = self._k[:, :, :w], self._v[:, :, :w]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self._len + key_states.shape[-2]
        if end > self._k.shape[-2]:
            self._reserve(self.keys, self.values, spare=max(end - self._len, self._len))  # double
        self._k[:, :, self._len : end] = key_states
        self._v[:, :, self._len : end] = value_states
        self._len = end
        self.keys, self.values = self._k[:, :, :end], self._v[:, :, :end]
        return self.keys, self.values


def _layer_tensors(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _set_layer_tensors(cache: DynamicCache, tensors: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    assert len(tensors) == len(cache.layers)
    cache.layers[:] = [GrowableLayer(k, v) for k, v in tensors]


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    pad = width - t.shape[-2]  # t: [B, H, W, D]
    return t if pad == 0 else F.pad(t, (0, 0, pad, 0))


class BatchCache:
    """Rows (sequence ids) in a fixed order, their cached lengths, and the padded width."""

    def __init__(self) -> None:
        self.cache: DynamicCache | None = None
        self.seq_ids: list[int] = []
        self.lengths: list[int] = []
        self._rows: dict[int, int] | None = None  # seq_id -> row, rebuilt after the rows change

    def __len__(self) -> int:
        return len(self.seq_ids)

    @property
    def width(self) -> int:
        return self.cache.get_seq_length() if self.cache is not None else 0

    def row_of(self, seq_id: int) -> int:
        # A dict, not list.index: the decode step asks for every row, O(B) instead of O(B²).
        if self._rows is None:
            self._rows = {s: i for i, s in enumerate(self.seq_ids)}
        return self._rows[seq_id]

    def add(self, seq_ids: list[int], cache: DynamicCache, lengths: list[int]) -> None:
        """Append the rows of a freshly prefilled, right-aligned cache."""
        self._rows = None
        if self.cache is None or not self.seq_ids:
            _set_layer_tensors(cache, _layer_tensors(cache))
            self.cache, self.seq_ids, self.lengths = cache, list(seq_ids), list(lengths)
            return
        width = max(self.width, cache.get_seq_length())
        merged = [
            (torch.cat([_left_pad(k1, width), _left_pad(k2, width)]), torch.cat([_left_pad(v1, width), _left_pad(v2, width)]))
            for (k1, v1), (k2, v2) in zip(_layer_tensors(self.cache), _layer_tensors(cache), strict=True)
        ]  # each [B1 + B2, H, width, D]
        _set_layer_tensors(self.cache, merged)
        self.seq_ids += seq_ids
        self.lengths += lengths

    def remove(self, seq_ids: set[int]) -> None:
        keep = [i for i, s in enumerate(self.seq_ids) if s not in seq_ids]
        if len(keep) == len(self.seq_ids):
            return
        self._rows = None
        if not keep:
            self.cache, self.seq_ids, self.lengths = None, [], []
            return
        self.seq_ids = [self.seq_ids[i] for i in keep]
        self.lengths = [self.lengths[i] for i in keep]
        assert self.cache is not None
        drop = self.width - max(self.lengths)  # columns that are padding in every remaining row
        index = torch.tensor(keep, device=self.cache.layers[0].keys.device)
        _set_layer_tensors(
            self.cache,
            [(k.index_select(0, index)[:, :, drop:], v.index_select(0, index)[:, :, drop:]) for k, v in _layer_tensors(self.cache)],
        )

    def decode_inputs(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """attention_mask [B, W + 1] and position_ids [B, 1] for one new token per row."""
        width = self.width
        lengths = torch.tensor(self.lengths, device=device)  # [B]
        cols = torch.arange(width + 1, device=device)  # [W + 1]
        mask = (cols.unsqueeze(0) >= (width - lengths).unsqueeze(1)).long()  # [B, W + 1]
        return mask, lengths.unsqueeze(1)

    def advance(self) -> None:
        self.lengths = [n + 1 for n in self.lengths]


def prefill_inputs(prompts: list[list[int]], pad_id: int, device: torch.device):
    """Left-padded input_ids / attention_mask / position_ids [B, T] for a batch of prompts."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[b, width - len(p) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)
