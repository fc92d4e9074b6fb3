"""Attention over paged KV, plugged into Hugging Face models through transformers' AttentionInterface.

A served model is switched once to the "memdec" implementation (`use_paged_attention`); its modeling
code is unchanged. A forward that carries `memdec_ctx=` (a `PrefillContext`, `DecodeContext` or
`VerifyContext`) stores its new keys/values into the pages and attends over them. Every other forward
(HF `generate`, the toolkit, test references, perplexity windows) falls through to transformers' SDPA
function with the mask HF builds, so the model behaves exactly as with `attn_implementation="sdpa"`.

Engine forwards pass a ready 4-D `attention_mask`, which makes HF return it as is: no mask is built,
and nothing on the path reads a tensor back to the host.

PyTorch-native (SDPA) so the CPU tests run the same code as the GPU. Decode gathers each row's pages
into a contiguous [rows, kv_heads, tokens, head_dim] view per layer and attends with a length mask;
grouped-query heads are folded into the query length so no key/value is repeated. Verify (speculative
mixing) is decode with several query tokens per row: each attends to its row's cached prefix and,
causally, to the tokens before it in its own block.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from server.kv import ModelKV

NAME = "memdec"


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, memdec_ctx=None,
               **kwargs):
    if memdec_ctx is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    return memdec_ctx.attend(module.layer_idx, query, key, value, scaling, kwargs.get("sliding_window"))


AttentionInterface.register(NAME, _attention)
# Plain forwards get the mask SDPA would get; engine forwards skip mask creation (their mask is 4-D).
AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])

# What prefill forwards pass as `attention_mask` (the context carries everything), one per device.
_NO_MASK: dict[torch.device, torch.Tensor] = {}


def use_paged_attention(model: PreTrainedModel) -> None:
    if model.config._attn_implementation != NAME:
        model.set_attn_implementation(NAME)


def _check(kv: ModelKV, key: torch.Tensor) -> None:
    g = kv.geometry
    if key.shape[1] != g.num_kv_heads or key.shape[-1] != g.head_dim:
        raise RuntimeError(
            f"attention keys have {key.shape[1]} heads of {key.shape[-1]}, the KV cache was laid out for "
            f"{g.num_kv_heads} of {g.head_dim}: this architecture is not supported by the paged cache"
        )


@dataclass
class SingleTokens:
    """The one-token segments of a packed row that continue a cache (decode rows sharing a forward with prompt
    chunks): attended in one batched call, as `DecodeContext` does, rather than one call per row."""

    segments: frozenset[int]  # their indices among the context's segments
    positions: torch.Tensor  # [B] their places in the packed row
    tables: torch.Tensor  # [B, nblk] pages of each, in order (padding: the scratch page)
    lengths: torch.Tensor  # [B] tokens each attends to, its own included
    _masks: dict[int | None, torch.Tensor] = field(default_factory=dict)  # per window: built once per forward

    def attend(self, keys: torch.Tensor, values: torch.Tensor, q: torch.Tensor, scale: float | None,
               window: int | None):
        # q: [1, H, N, D] -> the rows' queries [B, H, D]; returns [1, H, B, D] for out[:, :, positions].
        b = self.positions.shape[0]
        h, d = q.shape[1], q.shape[-1]
        hkv = keys.shape[2]
        pages = self.tables.flatten()
        kk = keys.index_select(0, pages).view(b, -1, hkv, d).transpose(1, 2)  # [B, Hkv, L, D]
        vv = values.index_select(0, pages).view(b, -1, hkv, d).transpose(1, 2)
        qg = q[0, :, self.positions].transpose(0, 1).reshape(b, hkv, h // hkv, d)  # [B, Hkv, G, D]
        if window not in self._masks:
            cols = torch.arange(kk.shape[2], device=q.device)[None, :]  # [1, L]
            mask = cols < self.lengths[:, None]
            if window is not None:
                mask &= cols >= (self.lengths - window)[:, None]
            self._masks[window] = mask[:, None, None, :]
        # [B, Hkv, G, D]
        out = F.scaled_dot_product_attention(qg, kk, vv, attn_mask=self._masks[window], scale=scale)
        return out.reshape(b, h, d).transpose(0, 1).unsqueeze(0)  # [1, H, B, D]


@dataclass
class PrefillContext:
    """Prompt chunks packed into one row of N tokens: [1, N]. Each sequence's chunk is a segment.

    A segment may continue a sequence whose first `cached[i]` tokens are already in the cache (a
    prefix-cache hit, or earlier chunks of a chunked prefill): its queries sit at positions
    [cached, cached + n) and attend causally to its own tokens and to every cached position, read back
    from the segment's pages (`context[i]`: its block table up to the chunk's end). Segments that
    start at 0 attend within the packed row itself, as before.
    """

    kv: ModelKV
    page: torch.Tensor  # [N] page receiving each token's keys/values
    offset: torch.Tensor  # [N] position inside that page
    segments: list[tuple[int, int]]  # (start, length) in the packed row; host ints
    cached: list[int] | None = None  # per segment: tokens already cached before it (None: all 0)
    # per segment with cached > 0: [nblk] its pages, in order
    context: list[torch.Tensor | None] | None = None
    singles: SingleTokens | None = None  # one-token segments on a cache (decode rows): attended together
    _windows: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    _cached_masks: dict[tuple[int, int, int | None], torch.Tensor] = field(default_factory=dict)

    @property
    def attention_mask(self) -> torch.Tensor:
        device = self.page.device
        if device not in _NO_MASK:
            _NO_MASK[device] = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device)
        return _NO_MASK[device]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None,
               window: int | None):
        # q: [1, H, N, D]; k, v: [1, Hkv, N, D]
        _check(self.kv, k)
        keys, values = self.kv.keys[layer], self.kv.values[layer]  # [P, block, Hkv, D]
        keys[self.page, self.offset] = k[0].transpose(0, 1)  # [N, Hkv, D]
        values[self.page, self.offset] = v[0].transpose(0, 1)
        gqa = q.shape[1] != k.shape[1]
        cached = self.cached or [0] * len(self.segments)
        lengths = {n for _, n in self.segments}
        if len(lengths) == 1 and window is None and not any(cached):
            # Equal segments: one batched call over [S, H, T, D] views of the packed row.
            n = lengths.pop()
            s = len(self.segments)
            qs, ks, vs = (t[0].unflatten(1, (s, n)).transpose(0, 1) for t in (q, k, v))  # [S, H|Hkv, T, D]
            out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=gqa)
            return out.permute(0, 2, 1, 3).reshape(1, s * n, q.shape[1], q.shape[-1]), None  # [1, N, H, D]
        out = torch.empty_like(q)
        if self.singles is not None:
            out[:, :, self.singles.positions] = self.singles.attend(keys, values, q, scale, window)
        for i, (start, n) in enumerate(self.segments):
            seg = slice(start, start + n)
            c = cached[i]
            if self.singles is not None and i in self.singles.segments:
                continue
            if c:
                # Keys/values of positions [0, c + n) from the segment's pages (this chunk's were just
                # written).
                pages = self.context[i] if self.context is not None else None
                assert pages is not None, "a segment with a cached prefix needs its pages"
                hkv, d = k.shape[1], k.shape[-1]
                # [1, Hkv, L, D]
                kk = keys.index_select(0, pages).view(-1, hkv, d)[: c + n].transpose(0, 1).unsqueeze(0)
                vv = values.index_select(0, pages).view(-1, hkv, d)[: c + n].transpose(0, 1).unsqueeze(0)
                cmask = self._cached_mask(c, n, window, q.device)  # [n, c + n]
                out[:, :, seg] = F.scaled_dot_product_attention(q[:, :, seg], kk, vv, attn_mask=cmask,
                                                                scale=scale, enable_gqa=gqa)
                continue
            mask = None if window is None else self._window_mask(n, window, q.device)
            out[:, :, seg] = F.scaled_dot_product_attention(
                q[:, :, seg], k[:, :, seg], v[:, :, seg], attn_mask=mask, is_causal=mask is None, scale=scale,
                enable_gqa=gqa,
            )
        return out.transpose(1, 2).contiguous(), None  # [1, N, H, D]

    def _window_mask(self, n: int, window: int, device: torch.device) -> torch.Tensor:
        key = (n, window)
        if key not in self._windows:
            i = torch.arange(n, device=device)
            self._windows[key] = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)  # [T, T]
        return self._windows[key]

    def _cached_mask(self, cached: int, n: int, window: int | None, device: torch.device) -> torch.Tensor:
        """[n, cached + n]: query i (position cached + i) sees columns up to itself (and within the window).
        Built once per forward (every layer of a model attends with the same masks)."""
        key = (cached, n, window)
        if key not in self._cached_masks:
            self._cached_masks[key] = self._build_cached_mask(cached, n, window, device)
        return self._cached_masks[key]

    @staticmethod
    def _build_cached_mask(cached: int, n: int, window: int | None, device: torch.device) -> torch.Tensor:
        pos = cached + torch.arange(n, device=device)[:, None]  # [n, 1]
        cols = torch.arange(cached + n, device=device)[None, :]  # [1, L]
        mask = cols <= pos
        if window is not None:
            mask &= cols > pos - window
        return mask


@dataclass
class DecodeContext:
    """One new token per row: [B, 1]. Rows attend over their pages up to their length."""

    kv: ModelKV
    page: torch.Tensor  # [B] page receiving each row's new token
    offset: torch.Tensor  # [B]
    tables: torch.Tensor  # [B, nblk] pages to attend over, in order
    lengths: torch.Tensor  # [B] tokens per row including the new one
    attention_mask: torch.Tensor = field(init=False)  # [B, 1, 1, L] True where a row has a token
    _windows: dict[int, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        span = self.tables.shape[1] * self.kv.block_size
        cols = torch.arange(span, device=self.tables.device)  # [L]
        self.attention_mask = (cols[None, :] < self.lengths[:, None])[:, None, None, :]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None,
               window: int | None):
        # q: [B, H, 1, D]; k, v: [B, Hkv, 1, D]
        _check(self.kv, k)
        keys, values = self.kv.keys[layer], self.kv.values[layer]  # [P, block, Hkv, D]
        keys[self.page, self.offset] = k[:, :, 0]
        values[self.page, self.offset] = v[:, :, 0]
        b, h, _, d = q.shape
        hkv = k.shape[1]
        # [B * nblk, block, Hkv, D] -> [B, Hkv, L, D]: each row's tokens in order. index_select, not
        # advanced indexing: it copies whole pages (3-4x faster on CPU).
        pages = self.tables.flatten()
        kk = keys.index_select(0, pages).view(b, -1, hkv, d).transpose(1, 2)
        vv = values.index_select(0, pages).view(b, -1, hkv, d).transpose(1, 2)
        # Grouped-query heads as the query length: query head i uses kv head i // (H / Hkv), as in repeat_kv.
        qg = q.view(b, hkv, h // hkv, d)  # [B, Hkv, G, D]
        mask = self.attention_mask if window is None else self._window_mask(window)
        out = F.scaled_dot_product_attention(qg, kk, vv, attn_mask=mask, scale=scale)  # [B, Hkv, G, D]
        return out.reshape(b, 1, h, d), None  # [B, 1, H, D]

    def _window_mask(self, window: int) -> torch.Tensor:
        if window not in self._windows:
            span = self.attention_mask.shape[-1]
            cols = torch.arange(span, device=self.lengths.device)
            inside = cols[None, :] >= (self.lengths - window)[:, None]
            self._windows[window] = self.attention_mask & inside[:, None, None, :]
        return self._windows[window]


@dataclass
class VerifyContext:
    """T new tokens per row on top of its cached prefix: [B, T] (speculative mixing's verify forward).

    Row b's token t sits at position start[b] + t and attends to every cached position and to its own
    block up to itself. Tokens past a row's real ones (rows drafting fewer tokens, padding rows; see
    `graphs.verify_forward`) have the model's scratch page in `page` and their outputs are ignored, so
    they never write a page they do not own.
    """

    kv: ModelKV
    page: torch.Tensor  # [B, T] page receiving each token's keys/values (scratch for invalid tokens)
    offset: torch.Tensor  # [B, T]
    tables: torch.Tensor  # [B, nblk] pages to attend over, in order
    start: torch.Tensor  # [B] tokens cached before this forward (position of token 0)
    attention_mask: torch.Tensor = field(init=False)  # [B, 1, T, L] True where token t sees column l
    _windows: dict[int, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        span = self.tables.shape[1] * self.kv.block_size
        cols = torch.arange(span, device=self.tables.device)  # [L]
        # [B, T] own position
        last = self.start[:, None] + torch.arange(self.page.shape[1], device=self.tables.device)
        self.attention_mask = (cols[None, None, :] <= last[:, :, None])[:, None]  # [B, 1, T, L]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None,
               window: int | None):
        # q: [B, H, T, D]; k, v: [B, Hkv, T, D]
        _check(self.kv, k)
        keys, values = self.kv.keys[layer], self.kv.values[layer]  # [P, block, Hkv, D]
        keys[self.page, self.offset] = k.transpose(1, 2)  # [B, T, Hkv, D]
        values[self.page, self.offset] = v.transpose(1, 2)
        b, h, t, d = q.shape
        hkv = k.shape[1]
        g = h // hkv
        pages = self.tables.flatten()
        kk = keys.index_select(0, pages).view(b, -1, hkv, d).transpose(1, 2)  # [B, Hkv, L, D]
        vv = values.index_select(0, pages).view(b, -1, hkv, d).transpose(1, 2)
        # Grouped-query heads folded into the query length, as in decode: [B, Hkv, G*T, D].
        qg = q.reshape(b, hkv, g * t, d)
        mask = self.attention_mask if window is None else self._window_mask(window)  # [B, 1, T, L]
        mask = mask.unsqueeze(2).expand(b, 1, g, t, mask.shape[-1]).reshape(b, 1, g * t, -1)  # [B, 1, G*T, L]
        out = F.scaled_dot_product_attention(qg, kk, vv, attn_mask=mask, scale=scale)  # [B, Hkv, G*T, D]
        return out.view(b, h, t, d).transpose(1, 2).contiguous(), None  # [B, T, H, D]

    def _window_mask(self, window: int) -> torch.Tensor:
        if window not in self._windows:
            span = self.attention_mask.shape[-1]
            cols = torch.arange(span, device=self.start.device)  # [L]
            last = self.start[:, None] + torch.arange(self.page.shape[1], device=self.start.device)  # [B, T]
            inside = cols[None, None, :] > (last - window)[:, :, None]  # [B, T, L]
            self._windows[window] = self.attention_mask & inside[:, None]
        return self._windows[window]
