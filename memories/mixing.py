"""The Memory Decoder mixture p = α·p_mem + (1−α)·p_base, in log space."""

from __future__ import annotations

import math

import torch

ALPHA_MIN, ALPHA_MAX = 0.0, 1.0  # α is a mixture weight: the memory's share of the probability mass


def check_alpha(alpha: object) -> float:
    """α as a float, or ValueError when it is not a finite number in [0, 1] (bools are not numbers here).

    The one α rule: the HTTP schema's bounds, the CLI, the registry file, the registry, the engine and
    the manifest all call this (the server maps the ValueError to its own error class).
    """
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not ALPHA_MIN <= alpha <= ALPHA_MAX:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    return float(alpha)


# The memory's logits are divided by its temperature before mixing (the reference implementation's knn_temp).
MIN_MEMORY_TEMPERATURE, MAX_MEMORY_TEMPERATURE = 0.01, 100.0


def check_temperature(value: object) -> float:
    """A memory temperature as a float, or ValueError when it is not a number in [0.01, 100].

    The one temperature rule, like `check_alpha`: the manifest, the toolkit's CLI, the HTTP schema's bounds
    and request validation all use it, so a memory's default temperature is always one a request may use.
    """
    if (isinstance(value, bool) or not isinstance(value, int | float)
            or not MIN_MEMORY_TEMPERATURE <= value <= MAX_MEMORY_TEMPERATURE):  # fmt: skip
        raise ValueError(f"temperature must be in [{MIN_MEMORY_TEMPERATURE}, {MAX_MEMORY_TEMPERATURE}], got {value!r}")
    return float(value)


def alpha_logs(alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log α, log(1−α)) with exact −inf at the ends, so α=0 and α=1 give one model exactly."""
    alpha = alpha.to(torch.float32)
    return torch.log(alpha), torch.log1p(-alpha)


def mix_logprobs(base_logp: torch.Tensor, mem_logp: torch.Tensor, alpha: torch.Tensor | float) -> torch.Tensor:
    """logaddexp(log α + mem_logp, log(1−α) + base_logp), broadcast over leading dims.

    base_logp, mem_logp: [..., V] float32 log-probabilities (or gathered [...] values);
    alpha: scalar or [...] with one value per row; it is broadcast on the last dim.
    """
    if not torch.is_tensor(alpha):
        alpha = torch.tensor(float(alpha), device=base_logp.device)
    log_a, log_1ma = alpha_logs(alpha)
    while log_a.dim() < base_logp.dim():
        log_a, log_1ma = log_a.unsqueeze(-1), log_1ma.unsqueeze(-1)
    return mix_with_logs(base_logp, mem_logp, log_a, log_1ma)


def mix_with_logs(base_logp: torch.Tensor, mem_logp: torch.Tensor, log_a: torch.Tensor, log_1ma: torch.Tensor) -> torch.Tensor:
    """The same mixture from α's logs, already shaped to broadcast (the engine computes them once per batch)."""
    return torch.logaddexp(log_a + mem_logp, log_1ma + base_logp)


def memory_logprobs(logits: torch.Tensor, temperature: torch.Tensor | float | None = None) -> torch.Tensor:
    """A memory's next-token log-probs: log_softmax(logits / T) in float32 over the last dim (the reference
    implementation's `knn_temp`). `temperature`: None or 1.0 (untouched logits), a float, or a tensor that
    broadcasts against `logits` (one value per row: [b, 1], [b, 1, 1] ...)."""
    logits = logits.float()
    if temperature is not None and not (isinstance(temperature, float | int) and temperature == 1.0):
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1)


def mix_scalar(base_lp: float, mem_lp: float, alpha: float) -> float:
    """Mixed log-probability of one token (plain floats): used by references and reports."""
    terms = []
    if alpha > 0:
        terms.append(math.log(alpha) + mem_lp)
    if alpha < 1:
        terms.append(math.log1p(-alpha) + base_lp)
    m = max(terms)
    return m + math.log(sum(math.exp(t - m) for t in terms))


def base_weight(alphas: list[float] | tuple[float, ...]) -> float:
    """The base's weight 1 − Σ αᵢ of a mixture of several memories (float64, clamped at 0 against rounding)."""
    return max(0.0, 1.0 - math.fsum(alphas))


def mix_many(base_logp: torch.Tensor, memories: list[tuple[torch.Tensor, float]]) -> torch.Tensor:
    """log(Σ αᵢ·pᵢ + (1 − Σ αᵢ)·p_base) from log-probs (same shapes), α's as floats; one memory is `mix_logprobs`."""
    w = base_weight([a for _, a in memories])
    out = base_logp + (math.log(w) if w > 0 else float("-inf"))
    for mem_logp, alpha in memories:
        if alpha > 0:
            out = torch.logaddexp(out, mem_logp + math.log(alpha))
    return out


def mix_terms(weighted_base: torch.Tensor, mem_logp: torch.Tensor, log_alpha: torch.Tensor) -> torch.Tensor:
    """Add one memory's α·p to a mixture in logs: logaddexp(mixture so far, log α + mem_logp). The engine starts
    from log(1 − Σ αᵢ) + base_logp and adds each memory in turn; with one memory it is `mix_with_logs`."""
    return torch.logaddexp(weighted_base, log_alpha + mem_logp)
