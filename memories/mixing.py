"""The Memory Decoder mixture p = α·p_mem + (1−α)·p_base, in log space, and its type.

A `Mixture` is what a request mixes in: terms of (memory, α or its router, temperature), p = Σ αᵢ·pᵢ +
(1 − Σ αᵢ)·p_base. It is built and checked once, where a request enters (its constructor holds every rule:
α's in [0, 1] summing to at most 1, temperatures in bounds, distinct memories, a router only alone), and
is carried as it is from there on; nothing downstream checks it again.

`apply` is the formula itself, on tensors: the base's log-probs, plus one `Part` per memory (its log-probs and
its log-weights, fixed or the router's per position). Decoding, prefill, echo, speculative verification,
perplexity and the toolkit's evaluation all mix through it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

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
            or not MIN_MEMORY_TEMPERATURE <= value <= MAX_MEMORY_TEMPERATURE):
        raise ValueError(f"temperature must be in [{MIN_MEMORY_TEMPERATURE}, {MAX_MEMORY_TEMPERATURE}], "
                         f"got {value!r}")
    return float(value)


def alpha_logs(alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log α, log(1−α)) with exact −inf at the ends, so α=0 and α=1 give one model exactly."""
    alpha = alpha.to(torch.float32)
    return torch.log(alpha), torch.log1p(-alpha)


MAX_MEMORIES = 8  # memories mixed in one request
# Σ αᵢ may exceed 1 by this much (decimal rounding: 0.1 + 0.2 + 0.7); the base weight is clamped at 0
ALPHA_SUM_SLACK = 1e-6
AUTO_ALPHA = "auto"  # `"alpha": "auto"`: the memory's learned router sets α at every position
AUTO_TAKES_ONE = '"alpha": "auto" takes one memory: several memories need a list of numbers'


class MixtureError(ValueError):
    """A mixture no request may have. `param` names the request field at fault and `code` a machine-readable
    reason; the server turns it into its own 400 in one place (`server.validation.mixture_errors`)."""

    def __init__(self, message: str, param: str = "alpha", code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


def no_router(name: str) -> MixtureError:
    return MixtureError(f"memory {name!r} has no router: \"alpha\": \"auto\" needs one (fit it with "
                        "`memdec memory router`); give a number instead", code="memory_has_no_router")


class MemoryDefaults(Protocol):
    """What `Mixture.resolve` needs to know of a memory: its name, its manifest's α and temperature, its
    router."""

    @property
    def name(self) -> str: ...
    @property
    def alpha(self) -> float: ...
    @property
    def temperature(self) -> float: ...
    @property
    def router(self) -> object: ...


@dataclass(frozen=True)
class Term:
    """One memory of a mixture: its weight α (None: its router sets α at every position) and temperature."""

    memory: str
    alpha: float | None
    temperature: float = 1.0

    def __post_init__(self) -> None:
        try:
            alpha = None if self.alpha is None else check_alpha(self.alpha)
        except ValueError as exc:
            raise MixtureError(str(exc)) from None
        try:
            temperature = check_temperature(self.temperature)
        except ValueError as exc:
            raise MixtureError(f"memory_{exc}", param="memory_temperature") from None
        object.__setattr__(self, "alpha", alpha)  # floats from here on (a request may send 1 for 1.0)
        object.__setattr__(self, "temperature", temperature)

    @property
    def routed(self) -> bool:
        return self.alpha is None


def _one_alpha_per_memory(n: int, got: str) -> MixtureError:
    if n > 1:
        return MixtureError(f"'alpha' must be a list of {n} weights with {n} memories (one per memory), "
                            f"got {got}")
    return MixtureError(f"one memory takes one 'alpha', got {got}")


def _one_temperature_per_memory(n: int, got: int) -> MixtureError:
    if n > 1:
        return MixtureError(f"'memory_temperature' must be a number or a list of {n} (one per memory), "
                            f"got {got} values", param="memory_temperature")
    return MixtureError("a list of 'memory_temperature' needs one value per memory",
                        param="memory_temperature")


@dataclass(frozen=True)
class Mixture:
    """What a request mixes into the base: p = Σ αᵢ·pᵢ + (1 − Σ αᵢ)·p_base over its terms, in request order
    (a term at α = 0 is kept: it names a memory the request uses for its context, but is not run). Empty: the
    base alone. A routed term (α None) is the only term: several routers have no rule for sharing α_t."""

    terms: tuple[Term, ...] = ()

    def __post_init__(self) -> None:
        names = [t.memory for t in self.terms]
        if len(names) > MAX_MEMORIES:
            raise MixtureError(f"at most {MAX_MEMORIES} memories in one request, got {len(names)}",
                               param="memory")
        dup = next((n for i, n in enumerate(names) if n in names[:i]), None)
        if dup is not None:
            raise MixtureError(f"memory {dup!r} is named twice in 'memory'", param="memory")
        if any(t.routed for t in self.terms) and len(self.terms) > 1:
            raise MixtureError(AUTO_TAKES_ONE)
        total = sum(t.alpha or 0.0 for t in self.terms)
        if total > 1.0 + ALPHA_SUM_SLACK:
            raise MixtureError("the memories' alphas must sum to at most 1 (the base gets 1 minus their "
                               f"sum), got {total:g}")

    @classmethod
    def one(cls, memory: str, alpha: float, temperature: float = 1.0) -> Mixture:
        return cls((Term(memory, alpha, temperature),))

    @classmethod
    def single(cls, memory: str | None, alpha: float = 0.0, temperature: float = 1.0) -> Mixture:
        """One memory at α, or the base alone when `memory` is None (for callers whose memory is optional)."""
        return cls() if memory is None else cls.one(memory, alpha, temperature)

    @classmethod
    def auto(cls, memory: str, temperature: float = 1.0) -> Mixture:
        """`"alpha": "auto"`: the memory's router sets α at every position."""
        return cls((Term(memory, None, temperature),))

    @classmethod
    def of(cls, memories: Sequence[str], alphas: Sequence[float],
           temperatures: Sequence[float] | None = None) -> Mixture:
        """Several memories, one α each and one temperature each (None: 1.0 for all)."""
        n = len(memories)
        if len(alphas) != n:
            raise _one_alpha_per_memory(n, f"{len(alphas)} values")
        temps = (1.0,) * n if temperatures is None else temperatures
        if len(temps) != n:
            raise _one_temperature_per_memory(n, len(temps))
        return cls(tuple(Term(m, a, t) for m, a, t in zip(memories, alphas, temps, strict=True)))

    @classmethod
    def resolve(cls, memories: Sequence[MemoryDefaults], alpha: object, temperature: object) -> Mixture:
        """The mixture a request's `alpha` and `memory_temperature` ask for on these memories (none: the base
        alone), each memory's manifest filling in what is left out. One memory takes one α (a number or a list
        of one) or "auto" (it must ship a router); several take a list of α's, one per memory (required: the
        manifests' α's each assume the memory is alone and may sum past 1). A temperature is a number (every
        memory's) or a list, one per memory; null is each memory's own."""
        if alpha == AUTO_ALPHA:
            if len(memories) > 1:
                raise MixtureError(AUTO_TAKES_ONE)
            if not memories:
                raise MixtureError('"alpha": "auto" needs a memory (\'memory\' or a memory as \'model\')')
            if not memories[0].router:
                raise no_router(memories[0].name)
        elif not memories and alpha is not None:
            raise MixtureError("'alpha' needs a memory ('memory' or a memory as 'model')")
        temps = _temperatures(memories, temperature)
        if alpha == AUTO_ALPHA:
            return cls.auto(memories[0].name, temps[0])
        alphas = _alphas(memories, alpha)  # as the request sent them: `Term` checks each one
        return cls(tuple(Term(m.name, a, t) for m, a, t in zip(memories, alphas, temps, strict=True)))  # type: ignore[arg-type]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.memory for t in self.terms)

    @property
    def active(self) -> tuple[Term, ...]:
        """The terms that are run and mixed: α > 0, or routed."""
        return tuple(t for t in self.terms if t.alpha is None or t.alpha > 0.0)

    @property
    def routed(self) -> bool:
        return any(t.routed for t in self.terms)

    @property
    def base_weight(self) -> float:
        """1 − Σ αᵢ of the fixed terms (a routed term's base weight is its router's, per position)."""
        return base_weight([t.alpha for t in self.terms if t.alpha is not None])

    @property
    def alpha_field(self) -> float | list[float] | str | None:
        """The `alpha` a response echoes: a number (one memory), a list (several), "auto", or null (the base
        alone)."""
        if not self.terms:
            return None
        if self.routed:
            return AUTO_ALPHA
        alphas = [t.alpha or 0.0 for t in self.terms]
        return alphas if len(alphas) > 1 else alphas[0]


def sweep(memory: str, alphas: Sequence[float], temperature: float = 1.0) -> tuple[Mixture, ...]:
    """One memory at each of several α's: the mixtures a perplexity sweep scores, one per α."""
    return tuple(Mixture.one(memory, a, temperature) for a in alphas)


def _alphas(memories: Sequence[MemoryDefaults], alpha: object) -> list[object]:
    n = len(memories)
    if n > 1:
        # the names' rules (how many, distinct) come first
        Mixture(tuple(Term(m.name, 0.0) for m in memories))
        if alpha is None:
            raise MixtureError(f"'alpha' is required with several memories: a list of {n} weights, one per "
                               "memory in 'memory' order, summing to at most 1")
        if not isinstance(alpha, list | tuple) or len(alpha) != n:
            raise _one_alpha_per_memory(n, f"{len(alpha)} values" if isinstance(alpha, list | tuple)
                                        else "a single number")
        return list(alpha)
    if isinstance(alpha, list | tuple):  # one memory: one weight (a list of one is that weight)
        if len(alpha) != 1:
            raise _one_alpha_per_memory(1, f"a list of {len(alpha)}")
        alpha = alpha[0]
    return [m.alpha if alpha is None else alpha for m in memories]


def _temperatures(memories: Sequence[MemoryDefaults], temperature: object) -> list[float]:
    n = len(memories)
    if isinstance(temperature, list | tuple):
        if len(temperature) != n or not n:
            raise _one_temperature_per_memory(n, len(temperature))
        return list(temperature)
    if temperature is None:
        return [float(m.temperature) for m in memories]
    if not n:
        raise MixtureError("'memory_temperature' needs a memory ('memory' or a memory as 'model')",
                           param="memory_temperature")
    return [temperature] * n  # type: ignore[list-item]


@dataclass(frozen=True)
class Part:
    """One memory's share of a mixture, on some rows of a batch, ready for `apply`.

    logp: [b, ..., V] the memory's log-probs (or gathered values [b, ...]); log_alpha: its log α, broadcasting
    against logp (a float, [b, 1], [A, 1] for a sweep of α's ...); log_keep: the log-weight the mixture so far
    keeps, log(1 − α), for a term whose base is not weighted yet (a router's α_t, one memory mixed from the
    plain base), or None when `apply`'s log_base_weight already weighted it; rows: [b] the batch rows the part
    covers (None: every row, in order, so no gather or scatter is needed).
    """

    logp: torch.Tensor
    log_alpha: torch.Tensor | float
    log_keep: torch.Tensor | float | None = None
    rows: torch.Tensor | None = None


def apply(base_logp: torch.Tensor, parts: Iterable[Part],
          log_base_weight: torch.Tensor | float | None = None) -> torch.Tensor:
    """The mixture's log-probs log(Σ αᵢ·pᵢ + (1 − Σ αᵢ)·p_base): the one formula every path mixes with.

    base_logp: [B, ..., V] (or gathered [B, ...]); log_base_weight: log(1 − Σ αᵢ) of the fixed α's,
    broadcasting against it ([B, 1] ...), or None (weight 1). Each part then adds log α + log p into its rows,
    scaling what the rows hold so far by its log_keep first when it has one: logaddexp(log_keep + mixed, log
    α + logp).
    """
    mixed = base_logp if log_base_weight is None else base_logp + log_base_weight
    for part in parts:
        if part.rows is None:
            mixed = _add(mixed, part)
            continue
        if mixed is base_logp:  # never write into the caller's tensor
            mixed = mixed.clone()
        mixed.index_copy_(0, part.rows, _add(mixed.index_select(0, part.rows), part))
    return mixed


def _add(mixed: torch.Tensor, part: Part) -> torch.Tensor:
    term = part.log_alpha + part.logp
    return torch.logaddexp(mixed if part.log_keep is None else part.log_keep + mixed, term)


def mix_logprobs(base_logp: torch.Tensor, mem_logp: torch.Tensor,
                 alpha: torch.Tensor | float) -> torch.Tensor:
    """One memory at α: logaddexp(log α + mem_logp, log(1−α) + base_logp), broadcast over leading dims.

    base_logp, mem_logp: [..., V] float32 log-probabilities (or gathered [...] values);
    alpha: scalar or [...] with one value per row; it is broadcast on the last dim.
    """
    if not torch.is_tensor(alpha):
        alpha = torch.tensor(float(alpha), device=base_logp.device)
    log_a, log_1ma = alpha_logs(alpha)
    while log_a.dim() < base_logp.dim():
        log_a, log_1ma = log_a.unsqueeze(-1), log_1ma.unsqueeze(-1)
    return apply(base_logp, [Part(mem_logp, log_a, log_1ma)])


def memory_logprobs(logits: torch.Tensor, temperature: torch.Tensor | float | None = None) -> torch.Tensor:
    """A memory's next-token log-probs: log_softmax(logits / T) in float32 over the last dim (the reference
    implementation's `knn_temp`). `temperature`: None or 1.0 (untouched logits), a float, or a tensor that
    broadcasts against `logits` (one value per row: [b, 1], [b, 1, 1] ...)."""
    logits = logits.float()
    if temperature is not None and not (isinstance(temperature, float | int) and temperature == 1.0):
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1)


def mix_scalar(base_lp: float, mem_lp: float, alpha: float) -> float:
    """Mixed log-probability of one token (plain floats): the references' and reports' independent formula."""
    terms = []
    if alpha > 0:
        terms.append(math.log(alpha) + mem_lp)
    if alpha < 1:
        terms.append(math.log1p(-alpha) + base_lp)
    m = max(terms)
    return m + math.log(sum(math.exp(t - m) for t in terms))


def base_weight(alphas: list[float] | tuple[float, ...]) -> float:
    """The base's weight 1 − Σ αᵢ of a mixture of several memories (float64, clamped at 0 against
    rounding)."""
    return max(0.0, 1.0 - math.fsum(alphas))


def mix_many(base_logp: torch.Tensor, memories: list[tuple[torch.Tensor, float]]) -> torch.Tensor:
    """log(Σ αᵢ·pᵢ + (1 − Σ αᵢ)·p_base) from log-probs (same shapes), α's as floats; one memory is
    `mix_logprobs`."""
    w = base_weight([a for _, a in memories])
    parts = [Part(mem_logp, math.log(alpha)) for mem_logp, alpha in memories if alpha > 0]
    return apply(base_logp, parts, math.log(w) if w > 0 else float("-inf"))
