"""Sampling from the mixed distribution: one batched pass on the device, no host round trip.

Each row draws one uniform number from a counter-based hash of (its seed, the index of the token
being drawn) and takes the token where the cumulative distribution crosses it (inverse-CDF sampling).
A row's draw therefore depends only on its own seed and position — never on its batch, its row index
or how often the engine stepped — so a seeded request gives the same tokens alone or in a crowd, and
after a preemption. Unseeded requests get a random seed at arrival (`Sequence.seed`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from server.request import SamplingParams

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x in [0, 2**32) without overflowing int64 (c is split in 16-bit halves)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (Wellons' lowbias32) on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniform(seed: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """A float64 in (0, 1) per row from 53 hashed bits of (seed, counter). seed: [B] int64 >= 0; counter: [B]."""
    h = _hash32((seed & _M32) ^ _hash32(((seed >> 32) & _M32) ^ _hash32(counter & _M32)))
    h2 = _hash32(h ^ 0x5BD1E995)
    bits = (h << 21) | (h2 >> 11)  # 53 bits
    return (bits.double() + 0.5) / float(2**53)


@dataclass(frozen=True)
class SamplingRows:
    """Per-row sampling parameters on the device ([B] each) and what the host knows about them."""

    temperature: torch.Tensor  # float32; 1.0 on greedy rows (never divided by zero)
    top_k: torch.Tensor  # int64, 0 = off
    top_p: torch.Tensor  # float32, 1.0 = off
    seed: torch.Tensor  # int64
    greedy: torch.Tensor  # bool
    any_sampled: bool
    any_filtered: bool  # some row uses top-k or top-p


def sampling_rows(params: list[SamplingParams], seeds: list[int], upload: Callable[[np.ndarray], torch.Tensor]) -> SamplingRows:
    """The device form of a batch's sampling parameters (`upload` puts a host array on the device)."""
    greedy = np.asarray([p.greedy for p in params], dtype=bool)
    return SamplingRows(
        # Capped so float32 never holds inf (−inf/inf would be NaN); past 1e30 the draw is uniform anyway.
        temperature=upload(np.asarray([1.0 if g else min(p.temperature, 1e30) for p, g in zip(params, greedy, strict=True)], dtype=np.float32)),
        top_k=upload(np.asarray([max(p.top_k, 0) for p in params], dtype=np.int64)),
        top_p=upload(np.asarray([p.top_p for p in params], dtype=np.float32)),
        seed=upload(np.asarray(seeds, dtype=np.int64)),
        greedy=upload(greedy),
        any_sampled=not bool(greedy.all()),
        any_filtered=any(p.top_k > 0 or p.top_p < 1.0 for p, g in zip(params, greedy, strict=True) if not g),
    )


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (to −inf) what falls outside top-k and the top-p nucleus, per row.

    logits: [B, V]; top_k: [B] int (0 = off); top_p: [B] float (1 = off).
    """
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)  # [B, V]
    vocab = logits.shape[-1]
    ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)  # [1, V]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))  # [B]
    drop = ranks >= k.unsqueeze(1)  # [B, V]
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)  # [B, V]
    # Drop a token when the mass strictly before it already reaches top_p; the top token always stays.
    before = probs.cumsum(dim=-1) - probs  # [B, V]
    drop |= before >= top_p.unsqueeze(1)
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, sorted_idx, sorted_logits)


def sample(logp: torch.Tensor, rows: SamplingRows, counter: torch.Tensor | None) -> torch.Tensor:
    """Next token per row. logp: [B, V] mixed log-probs; counter: [B] index of the token being drawn
    (only read when a row samples).

    Returns [B] int64 on logp's device. Greedy rows take the argmax.
    """
    argmax = logp.argmax(dim=-1)  # [B]
    if not rows.any_sampled:
        return argmax
    assert counter is not None
    logits = logp / rows.temperature.unsqueeze(1)  # [B, V]
    if rows.any_filtered:
        logits = apply_top_k_top_p(logits, rows.top_k, rows.top_p)
    cdf = logits.softmax(dim=-1).double().cumsum(dim=-1)  # [B, V]
    total = cdf[:, -1:]  # [B, 1] (1 up to rounding)
    # Strictly below the total, so the crossing is always a token with non-zero probability.
    x = torch.minimum(uniform(rows.seed, counter).unsqueeze(1) * total, torch.nextafter(total, torch.zeros_like(total)))
    drawn = torch.searchsorted(cdf, x, right=True).squeeze(1)  # first index whose cdf exceeds x
    return torch.where(rows.greedy, argmax, drawn)


def top_logprobs(logp: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-n (values, ids) per row of [B, V] log-probs: ([B, n], [B, n])."""
    return logp.topk(n, dim=-1) if n > 0 else (logp[:, :0], logp[:, :0].long())
