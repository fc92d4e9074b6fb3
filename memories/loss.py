"""The Memory Decoder objective, β·KL(p_kNN ‖ p_mem) + (1−β)·CE, computed from sparse kNN targets.

KL(p ‖ q) = Σ_{t ∈ supp p} p(t)·(log p(t) − log q(t)) with log q(t) = logit_t − logsumexp(logits):
only the logits at the target ids are gathered, so no vocabulary-sized target tensor is ever built.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LossParts:
    loss: torch.Tensor  # scalar, differentiable
    kl: torch.Tensor  # scalar (mean over positions that have a kNN target), detached
    ce: torch.Tensor  # scalar (mean over positions), detached


def sparse_kl(
    logits: torch.Tensor, knn_ids: torch.Tensor, knn_probs: torch.Tensor, lse: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-position KL(p_kNN ‖ softmax(logits)): [B, T].

    logits: [B, T, V] float32; knn_ids: [B, T, K] int64; knn_probs: [B, T, K] float32 with 0 on padding.
    """
    if lse is None:
        lse = torch.logsumexp(logits, dim=-1)  # [B, T]
    log_q = logits.gather(-1, knn_ids) - lse.unsqueeze(-1)  # [B, T, K]
    # xlogy gives 0·log 0 = 0, so padding and zero-probability entries contribute nothing.
    return (torch.special.xlogy(knn_probs, knn_probs) - knn_probs * log_q).sum(-1)  # [B, T]


@dataclass(frozen=True)
class BatchTotals:
    """Counts over a whole batch that several processes share: each averages over these, not its own rows."""

    positions: int
    with_target: torch.Tensor  # scalar: positions whose kNN target has mass, all processes' rows


def memory_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    knn_ids: torch.Tensor | None,
    knn_probs: torch.Tensor | None,
    beta: float,
    totals: BatchTotals | None = None,
) -> LossParts:
    """β·KL + (1−β)·CE, each averaged over positions. logits [B, T, V] (already cut to len(tokenizer)),
    labels [B, T]; without kNN targets (or with β = 0) this is plain language-model cross-entropy.

    With `totals` these rows are one process's share of a larger batch: the averages divide by the whole
    batch's counts, so the parts summed over the processes are one process's averages over the batch."""
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)  # [B, T]
    nll = lse - logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # [B, T]
    ce = nll.mean() if totals is None else nll.sum() / totals.positions
    if knn_ids is None or knn_probs is None or beta == 0.0:
        zero = torch.zeros((), device=logits.device)
        return LossParts(ce, zero, ce.detach())
    knn_probs = knn_probs.to(logits.dtype)
    kl_pos = sparse_kl(logits, knn_ids, knn_probs, lse)  # [B, T]
    has_target = knn_probs.sum(-1) > 0  # [B, T]; a position whose neighbours were all missing has none
    with_target = has_target.sum() if totals is None else totals.with_target
    kl = (kl_pos * has_target).sum() / with_target.clamp(min=1)
    return LossParts(beta * kl + (1.0 - beta) * ce, kl.detach(), ce.detach())
