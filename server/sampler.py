"""Sampling from the mixed distribution: one batched pass on the device, no host round trip.

Each row draws one uniform number from a counter-based hash of (its seed, the index of the token
being drawn) and takes the token where the cumulative distribution crosses it (inverse-CDF sampling).
A row's draw therefore depends only on its own seed and position — never on its batch, its row index
or how often the engine stepped — so a seeded request gives the same tokens alone or in a crowd, and
after a preemption. Unseeded requests get a random seed at arrival (`Sequence.seed`).

Speculative mixing (`propose`, `accept`) draws three numbers per position from the same hash, on three
streams: the memory's draft (DRAFT), the acceptance test (ACCEPT) and the residual draw (TOKEN, the
stream plain sampling uses). A speculative row's token at a position is a function of that position's
three numbers and the two distributions there, whatever round structure produced it, so a seeded
request is reproducible however many drafts each round made.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

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


# Streams of random numbers per (seed, position): TOKEN is plain sampling's (and the residual draw's).
TOKEN, DRAFT, ACCEPT = 0, 1, 2
_STREAM_KEYS = (0, 0x9E3779B9, 0x85EBCA6B)


def _unit(seed: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """A float64 in (0, 1) from 53 hashed bits of a seed and a hashed counter (both [N])."""
    h = _hash32((seed & _M32) ^ _hash32(((seed >> 32) & _M32) ^ c))
    h2 = _hash32(h ^ 0x5BD1E995)
    bits = (h << 21) | (h2 >> 11)  # 53 bits
    return (bits.double() + 0.5) / float(2**53)


def uniform(seed: torch.Tensor, counter: torch.Tensor, stream: int = TOKEN) -> torch.Tensor:
    """A float64 in (0, 1) per row from 53 hashed bits of (seed, counter, stream). seed: [B] int64 >= 0;
    counter: [B]. Stream TOKEN hashes exactly as before streams existed (seeded outputs do not move)."""
    c = _hash32(counter & _M32)
    if stream != TOKEN:
        c = _hash32(c ^ _STREAM_KEYS[stream])
    return _unit(seed, c)


def speculative_uniforms(seed: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """`uniform` on the three streams at once: [3, N] indexed by TOKEN, DRAFT, ACCEPT (one pass of small
    integer ops instead of three; on a CPU each op's overhead, not its arithmetic, is the cost)."""
    c = _hash32(counter & _M32)  # [N]
    streamed = _hash32(torch.cat([c ^ _STREAM_KEYS[DRAFT], c ^ _STREAM_KEYS[ACCEPT]]))  # [2N]
    return _unit(seed.repeat(3), torch.cat([c, streamed])).view(3, -1)


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
    any_greedy: bool = True

    def select(self, index: torch.Tensor) -> SamplingRows:
        """The rows `index` ([b] on the device), in that order; the host flags stay the batch's (a superset is
        safe)."""
        return replace(self, **{f: getattr(self, f).index_select(0, index) for f in _ROW_FIELDS})

    def repeat(self, n: int) -> SamplingRows:
        """Each row n times in a row ([B * n]): the parameters of B rows at n positions each, flattened."""
        return replace(self, **{f: getattr(self, f).repeat_interleave(n) for f in _ROW_FIELDS})


_ROW_FIELDS = ("temperature", "top_k", "top_p", "seed", "greedy")


def sampling_rows(params: list[SamplingParams], seeds: list[int],
                  upload: Callable[[np.ndarray], torch.Tensor]) -> SamplingRows:
    """The device form of a batch's sampling parameters (`upload` puts a host array on the device)."""
    greedy = np.asarray([p.greedy for p in params], dtype=bool)
    return SamplingRows(
        # Capped so float32 never holds inf (−inf/inf would be NaN); past 1e30 the draw is uniform anyway.
        temperature=upload(np.asarray([1.0 if g else min(p.temperature, 1e30)
                                       for p, g in zip(params, greedy, strict=True)], dtype=np.float32)),
        top_k=upload(np.asarray([max(p.top_k, 0) for p in params], dtype=np.int64)),
        top_p=upload(np.asarray([p.top_p for p in params], dtype=np.float32)),
        seed=upload(np.asarray(seeds, dtype=np.int64)),
        greedy=upload(greedy),
        any_sampled=not bool(greedy.all()),
        any_greedy=bool(greedy.any()),
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


def filtered_probs(logp: torch.Tensor, rows: SamplingRows) -> torch.Tensor:
    """Probabilities [B, V] (float32) of the distribution each row samples: temperature, then
    top-k / top-p."""
    logits = logp / rows.temperature.unsqueeze(1)  # [B, V]
    if rows.any_filtered:
        logits = apply_top_k_top_p(logits, rows.top_k, rows.top_p)
    return logits.softmax(dim=-1)


def draw(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw per row. weights: [B, V] >= 0, not all zero, need not sum to 1; u: [B] in (0, 1).

    The cumulative sum runs in float64 so a 152k vocabulary loses no resolution. Returns [B] int64.
    """
    cdf = weights.double().cumsum(dim=-1)  # [B, V]
    total = cdf[:, -1:]  # [B, 1]
    # Strictly below the total, so the crossing is always a token with non-zero weight.
    x = torch.minimum(u.unsqueeze(1) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, x, right=True).squeeze(1)  # first index whose cdf exceeds x


def sample(logp: torch.Tensor, rows: SamplingRows, counter: torch.Tensor | None) -> torch.Tensor:
    """Next token per row. logp: [B, V] mixed log-probs; counter: [B] index of the token being drawn
    (only read when a row samples).

    Returns [B] int64 on logp's device. Greedy rows take the argmax.
    """
    argmax = logp.argmax(dim=-1)  # [B]
    if not rows.any_sampled:
        return argmax
    assert counter is not None
    drawn = draw(filtered_probs(logp, rows), uniform(rows.seed, counter))
    return torch.where(rows.greedy, argmax, drawn)


@dataclass(frozen=True)
class Drafts:
    """The memory's proposals at some positions: the token and the distribution it was drawn from."""

    tokens: torch.Tensor  # [N] int64
    probs: torch.Tensor | None  # [N, V] transformed memory distribution q̃; None when every row is greedy


def propose(q_logp: torch.Tensor, rows: SamplingRows, u: torch.Tensor | None) -> Drafts:
    """Draft tokens from the memory: argmax q for greedy rows, else a draw from q̃ (q under the row's
    temperature / top-k / top-p). q_logp: [N, V]; u: [N] the DRAFT stream's numbers (None if all greedy)."""
    if not rows.any_sampled:
        return Drafts(q_logp.argmax(dim=-1), None)
    assert u is not None
    probs = filtered_probs(q_logp, rows)  # [N, V]
    drawn = draw(probs, u)  # [N]
    return Drafts(torch.where(rows.greedy, q_logp.argmax(dim=-1), drawn) if rows.any_greedy else drawn, probs)


def accept(
    p_logp: torch.Tensor, drafts: Drafts, drafted: torch.Tensor | None, rows: SamplingRows,
    u: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023) of the target p̃ from draft q̃, per
    position.

    p_logp: [N, V] mixed log-probs; drafts: at the same N positions; drafted: [N] bool, False where a
    position has no draft (then the token is exactly what `sample` draws), None when every position has
    one; u: [3, N] the positions' `speculative_uniforms` (None if all greedy).
    The draft x stays with probability min(1, p̃(x)/q̃(x)) (ACCEPT stream), else the token is drawn from
    max(0, p̃ − q̃) (TOKEN stream): either way it is distributed as p̃. Greedy rows: the token is argmax p,
    and the draft counts as accepted when it is that token.
    Returns (tokens [N], accepted [N] bool).
    """
    if not rows.any_sampled:
        argmax = p_logp.argmax(dim=-1)  # [N]
        return argmax, _and_mask(drafted, drafts.tokens == argmax)
    assert drafts.probs is not None and u is not None
    p = filtered_probs(p_logp, rows)  # [N, V]
    # no draft: q̃ = 0, so the residual is p̃
    q = drafts.probs if drafted is None else drafts.probs * drafted.unsqueeze(1)
    x = drafts.tokens.unsqueeze(1)  # [N, 1]
    p_x, q_x = p.gather(1, x).squeeze(1), q.gather(1, x).squeeze(1)  # [N]
    ok = _and_mask(drafted, u[ACCEPT] * q_x < p_x)  # u < p̃(x)/q̃(x), without dividing
    residual = (p - q).clamp_min_(0.0)  # [N, V]
    # All zero only when p̃ = q̃ up to rounding (then the draft is accepted but for rounding): use p̃.
    residual = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, p)
    tokens = torch.where(ok, drafts.tokens, draw(residual, u[TOKEN]))
    if rows.any_greedy:
        argmax = p_logp.argmax(dim=-1)
        tokens = torch.where(rows.greedy, argmax, tokens)
        ok = torch.where(rows.greedy, _and_mask(drafted, drafts.tokens == argmax), ok)
    return tokens, ok


def _and_mask(mask: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    """value & mask; a mask of None is all True."""
    return value if mask is None else value & mask


def top_logprobs(logp: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-n (values, ids) along the last dim of [..., V] log-probs: ([..., n], [..., n])."""
    return logp.topk(n, dim=-1) if n > 0 else (logp[..., :0], logp[..., :0].long())
