"""Mix, then sample: one batched pass over [B, V] float32 log-probabilities."""

from __future__ import annotations

import torch

from server.request import SamplingParams


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


def sample(
    logp: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> torch.Tensor:
    """Next token per row. logp: [B, V] mixed log-probs; returns [B] int64 on logp's device.

    Rows with temperature 0 take the argmax. Others draw with their own generator when seeded, so a
    seeded request gives the same tokens whatever else shares its batch.
    """
    tokens = logp.argmax(dim=-1)  # [B]
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if not sampled:
        return tokens
    rows = torch.tensor(sampled, device=logp.device)
    temps = torch.tensor([params[i].temperature for i in sampled], device=logp.device)  # [S]
    logits = logp.index_select(0, rows) / temps.unsqueeze(1)  # [S, V]
    if any(params[i].top_k > 0 or params[i].top_p < 1.0 for i in sampled):
        top_k = torch.tensor([max(params[i].top_k, 0) for i in sampled], device=logp.device)
        top_p = torch.tensor([params[i].top_p for i in sampled], device=logp.device)
        logits = apply_top_k_top_p(logits, top_k, top_p)
    probs = logits.softmax(dim=-1)  # [S, V]
    # Exponential race (argmax p/q, q ~ Exp(1)) equals categorical sampling and lets each row use its own generator.
    q = torch.empty_like(probs)
    for j, i in enumerate(sampled):
        q[j].exponential_(generator=generators[i])
    tokens[rows] = (probs / q).argmax(dim=-1)
    return tokens


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def top_logprobs(logp: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-n (values, ids) per row of [B, V] log-probs: ([B, n], [B, n])."""
    return logp.topk(n, dim=-1) if n > 0 else (logp[:, :0], logp[:, :0].long())
