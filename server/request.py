"""What flows into and out of the engine: plain frozen dataclasses, no HTTP and no tensors.

A request's mixture is a `memories.mixing.Mixture`, checked when it was built: the engine takes it as it is.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from memories.mixing import Mixture


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the model's context
    ABORT = "abort"  # client went away or the request was cancelled
    ERROR = "error"  # a failure inside the engine affected this request only


EMPTY_STOP = "stop strings must not be empty"  # refused here and, as a 400, at the API edge


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N of the mixed distribution per generated token (0 = chosen token only)
    prompt_logprobs: int | None = None  # same for every prompt token (echo); first token gets None

    def __post_init__(self) -> None:
        if self.max_tokens < 0:
            raise ValueError("max_tokens must be >= 0")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if any(s == "" for s in self.stop):
            raise ValueError(EMPTY_STOP)

    @property
    def greedy(self) -> bool:
        # Dividing by a temperature this small overflows float32 (NaN probabilities): it means greedy.
        return self.temperature < 1e-5


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams = field(default_factory=SamplingParams)
    mixture: Mixture = field(default_factory=Mixture)  # the memories it mixes in (none: the base alone)
    # the memory drafts, the base verifies, when the server speculates (--speculative-tokens)
    speculative: bool = True


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token_id, logprob), best first, of the mixed distribution


@dataclass(frozen=True)
class EngineOutput:
    """What one request gained in one engine step, in token ids (the engine knows no text)."""

    request_id: str
    new_token_ids: tuple[int, ...] = ()
    new_logprobs: tuple[TokenLogprob, ...] | None = None
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None  # only in the first output
    finished: bool = False
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None  # the stop token id that ended it (stop strings: see RequestOutput)
    error: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0  # cumulative


@dataclass(frozen=True)
class RequestOutput:
    """A delta as the API sees it: an engine delta plus its text (see `server.output`)."""

    request_id: str
    new_token_ids: tuple[int, ...] = ()
    new_text: str = ""
    new_logprobs: tuple[TokenLogprob, ...] | None = None
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None  # only in the first output
    finished: bool = False
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    error: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0  # cumulative


@dataclass(frozen=True)
class PerplexityRequest:
    request_id: str
    documents: tuple[tuple[int, ...], ...]
    # What is scored beside the base (and each memory alone), one score per mixture, in order: a sweep of one
    # memory's α's (one mixture per α, `memories.mixing.sweep`), one mixture of several memories, one routed
    # memory (`"alpha": "auto"`), or several memories each alone at its own α (`"memory": "auto"`'s choice).
    mixtures: tuple[Mixture, ...] = ()
    context_length: int | None = None
    stride: int | None = None
    # Score only windows [first_window, first_window + max_windows) of each document (None: to its end),
    # so that a client can score a long text in parts, with progress, and get exactly the whole-text numbers.
    first_window: int = 0
    max_windows: int | None = None
    # Keep each scored token's log-probs (None: only the sums); k > 0 also keeps each model's top k.
    token_logprobs: int | None = None

    @property
    def memory_names(self) -> tuple[str, ...]:
        """Every memory the mixtures name, once each, in order."""
        return tuple(dict.fromkeys(name for m in self.mixtures for name in m.names))

    @property
    def temperatures(self) -> tuple[float, ...]:
        """One temperature per memory of `memory_names` (a sweep's mixtures share their memory's)."""
        first = {t.memory: t.temperature for m in reversed(self.mixtures) for t in m.terms}
        return tuple(first[name] for name in self.memory_names)

    @property
    def several(self) -> bool:
        """One mixture of several memories."""
        return len(self.mixtures) == 1 and len(self.mixtures[0].terms) > 1

    @property
    def separately(self) -> bool:
        """Several memories, each scored alone at its own α (one mixture each)."""
        return len(self.mixtures) > 1 and len(self.memory_names) > 1

    @property
    def routed(self) -> bool:
        return any(m.routed for m in self.mixtures)

    @property
    def alphas(self) -> tuple[float, ...]:
        """The α's: a sweep's (one per mixture), several memories' weights (one per memory, either way they
        are scored), none for a routed memory."""
        return tuple(t.alpha for m in self.mixtures for t in m.terms if t.alpha is not None)

    @property
    def wants_distributions(self) -> bool:
        """Top alternatives, and the router's features, need both models' whole next-token distributions."""
        return bool(self.token_logprobs) or self.routed


@dataclass(frozen=True)
class PerplexityScore:
    nll: float  # summed negative log-likelihood (nats)
    num_tokens: int

    @property
    def mean_nll(self) -> float:
        return self.nll / self.num_tokens if self.num_tokens else 0.0


@dataclass(frozen=True)
class TokenCandidates:
    """One scored position's alternatives: each model's top k (base's first, then the memory's; an id may
    appear twice), with both models' log-probs of every candidate, so that a client can mix them at any α."""

    token_ids: tuple[int, ...]
    base: tuple[float, ...]
    memory: tuple[float, ...] | None  # None without a memory
    mixed: tuple[float, ...] | None  # at the first alpha


@dataclass(frozen=True)
class TokenScores:
    """Per-token log-probs of one document's scored tokens, positions `offset`, `offset + 1`, ..."""

    offset: int
    base: tuple[float, ...]
    memory: tuple[float, ...] | None  # None without a memory
    mixed: tuple[float, ...] | None  # at the first alpha; None without a memory
    top: tuple[TokenCandidates, ...] | None  # None unless top alternatives were asked for


@dataclass(frozen=True)
class DocumentPerplexity:
    base: PerplexityScore
    mixed: tuple[PerplexityScore, ...]  # one per alpha, in request order; empty without a memory
    memory_alone: PerplexityScore | None = None
    num_windows: int = 0  # the document's windows in all (the request may have scored a range of them)
    tokens: TokenScores | None = None  # when the request asked for token_logprobs


@dataclass(frozen=True)
class PerplexityResult:
    request_id: str
    documents: tuple[DocumentPerplexity, ...]
    context_length: int
    stride: int
