"""The HTTP wire format: pydantic models for request bodies and (for the OpenAPI document) responses.

Requests follow OpenAI's legacy completions API as vLLM implements it, plus memdec's `memory` and
`alpha`. Limits that depend on the server's configuration (n, logprobs) are checked by the routes.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from memories.mixing import ALPHA_MAX, ALPHA_MIN
from server.validation import MAX_ALPHAS, MAX_MEMORY_NAME

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

# Smart-mode unions pick the exact type match, so member order does not matter;
# strict types keep `true` or `1.5` from passing as a token id and `1` from passing as text.
Prompt = StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]

Alpha = Annotated[float, Field(ge=ALPHA_MIN, le=ALPHA_MAX)]
AlphaList = Annotated[list[Alpha], Field(min_length=1, max_length=MAX_ALPHAS)]

PROMPT_DOC = "a string, a list of strings, a list of token ids, or a list of token-id lists"


class _Body(BaseModel):
    # Infinity and NaN are valid in Python's JSON parser but never meaningful here.
    model_config = ConfigDict(allow_inf_nan=False)


class StreamOptions(_Body):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    include_usage: bool = Field(False, description="Send a last chunk with `usage` and empty `choices`.")
    continuous_usage_stats: bool = Field(False, description="vLLM extension: `usage` in every chunk.")


class CompletionRequest(_Body):
    """`POST /v1/completions`. Unknown fields are ignored (as vLLM does) and named in the server log."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: str | None = Field(
        None, description="The served base model name, or a memory name (that memory at its default alpha)."
    )
    prompt: Prompt = Field(..., description=f"The prompt(s): {PROMPT_DOC}.")
    max_tokens: int | None = Field(16, ge=0, description="Tokens to generate; 0 with `echo` scores the prompt only.")
    temperature: float | None = Field(1.0, ge=0, description="0 = greedy.")
    top_p: float | None = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, description="-1 or 0 = off.")
    n: int = Field(1, ge=1, description="Independent samples per prompt.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(None, ge=0, description="Top log-probs per token (of the mixed distribution).")
    echo: bool = Field(False, description="Return the prompt before the completion (with its log-probs).")
    stop: StrictStr | list[StrictStr] | None = None
    stop_token_ids: list[StrictInt] | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    ignore_eos: bool = False
    return_tokens_as_token_ids: bool = Field(
        False, description='vLLM extension: logprobs name tokens "token_id:<id>" instead of by their text.'
    )
    user: str | None = Field(None, description="Ignored.")
    memory: str | None = Field(
        None, description="A loaded memory's name; null = the base model alone. Default: the memory `model` names."
    )
    alpha: float | None = Field(
        None, ge=ALPHA_MIN, le=ALPHA_MAX,
        description="Weight of the memory in [0, 1]; default: the memory's manifest value.",
    )
    speculative: StrictBool = Field(
        True,
        description="Let the memory draft tokens for the base to verify when the server speculates "
        "(`--speculative-tokens`): the same distribution, usually faster; false decodes one token per step.",
    )
    # Accepted for client compatibility; only their neutral values are allowed.
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    suffix: str | None = None
    best_of: int | None = None


class PerplexityRequestBody(_Body):
    """`POST /v1/perplexity`: sliding-window perplexity of each input under the base, the mixture and the memory."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str | None = Field(None, description="The served base model name or a memory name.")
    memory: str | None = Field(None, description="A loaded memory's name; null = the base model alone.")
    alpha: Alpha | AlphaList | None = Field(
        None, description="Memory weight(s) in [0, 1]; a list scores every value in one pass. Default: the manifest's."
    )
    input: Prompt = Field(..., description=f"The document(s): {PROMPT_DOC}.")
    context_length: int | None = Field(None, ge=2, description="Window length (default min(1024, model context)).")
    stride: int | None = Field(None, ge=1, description="Window step (default half the window).")


class MemoryLoadBody(_Body):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = Field(..., min_length=1, max_length=MAX_MEMORY_NAME)
    path: str = Field(..., min_length=1, max_length=4096, description="Memory directory (under --memory-root).")
    alpha: float | None = Field(
        None, ge=ALPHA_MIN, le=ALPHA_MAX, description="Default alpha; the manifest's when omitted."
    )


# -- responses (documentation; routes build plain dicts of this shape) ------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None
    stop_reason: str | int | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    memory: str | None = None
    alpha: float | None = None


class AlphaScore(BaseModel):
    alpha: float
    nll: float
    perplexity: float


class PerplexityScores(BaseModel):
    num_tokens: int = Field(..., description="Tokens scored (every token after the first).")
    nll: float = Field(..., description="Mean negative log-likelihood per token (nats) at the (first) alpha.")
    perplexity: float = Field(..., description="exp(nll).")
    base_nll: float
    base_perplexity: float = Field(..., description="The base model alone (memory off).")
    memory_nll: float | None = None
    memory_perplexity: float | None = Field(None, description="The memory alone (alpha = 1).")
    alphas: list[AlphaScore] | None = Field(None, description="One entry per alpha when `alpha` is a list.")


class PerplexityDocument(PerplexityScores):
    index: int


class PerplexityResponse(BaseModel):
    id: str
    object: Literal["perplexity"] = "perplexity"
    created: int
    model: str
    memory: str | None
    alpha: float | list[float] | None
    context_length: int
    stride: int
    data: list[PerplexityDocument]
    overall: PerplexityScores
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "memdec"
    root: str
    parent: str | None = None
    max_model_len: int
    alpha: float | None = None
    domain: str | None = None
    description: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class MemoryDeleted(BaseModel):
    id: str
    object: Literal["memory"] = "memory"
    deleted: bool = True


class HealthStatus(BaseModel):
    status: str
    running: int | None = None
    waiting: int | None = None


def describe_extra(body: BaseModel) -> list[str]:
    """Names of unknown fields a client sent (for a log line; their values may hold prompts)."""
    extra: dict[str, Any] | None = body.model_extra
    return sorted(extra) if extra else []
