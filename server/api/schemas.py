"""The HTTP wire format: pydantic models for request bodies and (for the OpenAPI document) responses.

Requests follow OpenAI's completions and chat completions APIs as vLLM implements them, plus memdec's `memory`
and `alpha`. Limits that depend on the server's configuration (n, logprobs) are checked by the routes.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from memories.mixing import ALPHA_MAX, ALPHA_MIN, MAX_MEMORY_TEMPERATURE, MIN_MEMORY_TEMPERATURE
from server.validation import (
    MAX_ALPHAS,
    MAX_MEMORIES,
    MAX_MEMORY_NAME,
    MAX_TOKEN_LOGPROBS,
)

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

# Smart-mode unions pick the exact type match, so member order does not matter;
# strict types keep `true` or `1.5` from passing as a token id and `1` from passing as text.
Prompt = StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]

Alpha = Annotated[StrictFloat, Field(ge=ALPHA_MIN, le=ALPHA_MAX)]
AlphaList = Annotated[list[Alpha], Field(min_length=1, max_length=MAX_ALPHAS)]
AutoAlpha = Literal["auto"]  # the memory's learned router sets α at every position
# The `alpha` a response echoes (`Mixture.alpha_field`): a number, a list (several memories or a sweep),
# "auto" or null.
AlphaEcho = float | list[float] | str | None
MemoryList = Annotated[list[StrictStr], Field(min_length=1, max_length=MAX_MEMORIES)]
MemoryTemperature = Annotated[StrictFloat, Field(ge=MIN_MEMORY_TEMPERATURE, le=MAX_MEMORY_TEMPERATURE)]
MemoryTemperatureList = Annotated[list[MemoryTemperature], Field(min_length=1, max_length=MAX_MEMORIES)]

PROMPT_DOC = "a string, a list of strings, a list of token ids, or a list of token-id lists"
MEMORY_TEMPERATURE_DOC = (
    "The memory's logits are divided by it before its softmax, then mixed (the reference "
    "implementation's knn_temp); default: the memory's manifest `temperature`, else 1. With several "
    "memories: one number for all, or a list (one per memory); default: each memory's own."
)


class _Body(BaseModel):
    # Infinity and NaN are valid in Python's JSON parser but never meaningful here.
    model_config = ConfigDict(allow_inf_nan=False)


class StreamOptions(_Body):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    include_usage: bool = Field(False, description="Send a last chunk with `usage` and empty `choices`.")
    continuous_usage_stats: bool = Field(False, description="vLLM extension: `usage` in every chunk.")


class SamplingRequest(_Body):
    """What `/v1/completions` and `/v1/chat/completions` share: the target (model, memory, alpha), sampling,
    stopping and streaming. Unknown fields are ignored (as vLLM does) and named in the server log."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: str | None = Field(
        None, description="The served base model name, or a memory name (that memory at its default alpha)."
    )
    temperature: StrictFloat | None = Field(1.0, ge=0, description="0 = greedy.")
    top_p: StrictFloat | None = Field(1.0, gt=0, le=1)
    top_k: StrictInt | None = Field(None, ge=-1, description="-1 or 0 = off.")
    n: StrictInt = Field(1, ge=1, description="Independent samples per prompt.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stop_token_ids: list[StrictInt] | None = None
    seed: StrictInt | None = Field(None, ge=INT64_MIN, le=INT64_MAX)  # strict: `true` is not a seed
    ignore_eos: bool = False
    return_tokens_as_token_ids: bool = Field(
        False, description='vLLM extension: logprobs name tokens "token_id:<id>" instead of by their text.'
    )
    user: str | None = Field(None, description="Ignored.")
    memory: StrictStr | MemoryList | None = Field(
        None,
        description="A loaded memory's name; null = the base model alone. Default: the memory `model` names. "
        f"A list of up to {MAX_MEMORIES} distinct names mixes them all: p = sum(alpha_i * p_i) + "
        "(1 - sum(alpha_i)) * p_base (then `alpha` is required, one weight per memory).",
    )
    alpha: Alpha | AlphaList | AutoAlpha | None = Field(
        None,
        description="Weight of the memory in [0, 1]; default: the memory's manifest value. With several "
        "memories: a list, one weight per memory in `memory` order, summing to at most 1 (required). "
        "\"auto\": the memory's learned router sets alpha at every token (one memory, which must ship a "
        "router; see its model card).",
    )
    memory_temperature: MemoryTemperature | MemoryTemperatureList | None = Field(
        None,
        description=MEMORY_TEMPERATURE_DOC,
    )
    memory_candidates: list[StrictStr] | None = Field(
        None,
        description='With "memory": "auto": the memories to choose from (default: every loaded memory). The '
        "base alone is always a candidate.",
    )
    speculative: StrictBool = Field(
        True,
        description="Let the memory draft tokens for the base to verify when the server speculates "
        "(`--speculative-tokens`): the same distribution, usually faster; false decodes one token per step.",
    )
    # Sent by clients (vllm bench serve sends repetition_penalty: 1.0); the sampler does not implement them,
    # so only their neutral values are accepted (`server.validation.NEUTRAL`).
    presence_penalty: StrictFloat | None = Field(0.0, description="Only 0.")
    frequency_penalty: StrictFloat | None = Field(0.0, description="Only 0.")
    repetition_penalty: StrictFloat | None = Field(1.0, description="Only 1.")
    min_p: StrictFloat | None = Field(0.0, description="Only 0.")
    min_tokens: StrictInt | None = Field(0, description="Only 0.")
    logit_bias: dict[str, float] | None = Field(None, description="Only empty.")


class CompletionRequest(SamplingRequest):
    """`POST /v1/completions`."""

    prompt: Prompt = Field(..., description=f"The prompt(s): {PROMPT_DOC}.")
    max_tokens: StrictInt | None = Field(
        16, ge=0, description="Tokens to generate; 0 with `echo` scores the prompt only."
    )
    logprobs: StrictInt | None = Field(
        None, ge=0, description="Top log-probs per token (of the mixed distribution)."
    )
    echo: bool = Field(False, description="Return the prompt before the completion (with its log-probs).")
    # Accepted for client compatibility; only their neutral values are allowed.
    suffix: str | None = None
    best_of: StrictInt | None = None


class ChatContentPart(_Body):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    type: str = Field(..., description='Only "text".')
    text: str | None = None


ChatRole = Literal["system", "developer", "user", "assistant"]


class ChatMessage(_Body):
    """One message. Other OpenAI message fields (tool_calls, ...) are accepted only when null or empty."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    role: ChatRole
    content: StrictStr | list[ChatContentPart] | None = Field(
        None, description="A string or a list of text parts (joined with newlines, as vLLM does)."
    )
    name: StrictStr | None = None


class ChatTemplateOptions(_Body):
    """How messages become a prompt (shared by chat completions and `/tokenize`; vLLM's names and
    defaults)."""

    add_generation_prompt: StrictBool = Field(
        True, description="End the prompt with the template's assistant header."
    )
    continue_final_message: StrictBool = Field(
        False, description="Leave the last (assistant) message open so the model continues it."
    )
    chat_template: str | None = Field(
        None, description="Not supported: the server's template is used (--chat-template)."
    )
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="Extra variables for the chat template."
    )


ADD_SPECIAL_TOKENS_DOC = "Add the tokenizer's special tokens (e.g. BOS) on top of the template's."


class ChatCompletionRequest(SamplingRequest, ChatTemplateOptions):
    """`POST /v1/chat/completions`: OpenAI chat completions (as vLLM serves them) with memdec's memory and
    alpha."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    messages: list[ChatMessage] = Field(..., min_length=1, description="The conversation.")
    max_completion_tokens: StrictInt | None = Field(
        None, ge=1, description="Tokens to generate (default: to the end of the context)."
    )
    max_tokens: StrictInt | None = Field(
        None, ge=1, description="Older name of max_completion_tokens (which wins)."
    )
    logprobs: StrictBool = Field(
        False, description="Return each generated token's log-prob (of the mixed distribution)."
    )
    top_logprobs: StrictInt | None = Field(
        None, ge=0, description="With logprobs: the top N alternatives per token."
    )
    # Accepted for client compatibility; only their neutral values are allowed.
    tools: list[dict[str, Any]] | None = Field(None, description="Only empty: memdec does not call tools.")
    tool_choice: str | dict[str, Any] | None = Field(None, description='Only "none" or "auto" without tools.')
    response_format: dict[str, Any] | None = Field(None, description='Only {"type": "text"}.')
    add_special_tokens: StrictBool = Field(False, description=ADD_SPECIAL_TOKENS_DOC)


class TokenizeRequest(ChatTemplateOptions):
    """`POST /tokenize` (vLLM's shape): a `prompt` as completions tokenizes it, or `messages` as chat does."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str | None = Field(None, description="The base or a memory (sets `max_model_len`).")
    prompt: StrictStr | None = Field(None, description="Text to tokenize (give this or `messages`).")
    messages: list[ChatMessage] | None = Field(
        None, min_length=1, description="A conversation, rendered by the chat template."
    )
    add_special_tokens: StrictBool | None = Field(
        None,
        description=f"{ADD_SPECIAL_TOKENS_DOC} Default: true for a prompt, false for messages (as vLLM).",
    )
    return_token_strs: StrictBool = Field(
        False, description="Also return each token's string (the tokenizer's own form)."
    )


class DetokenizeRequest(_Body):
    """`POST /detokenize` (vLLM's shape)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str | None = None
    tokens: list[StrictInt] = Field(..., description="Token ids; special tokens are kept in the text.")


class PerplexityRequestBody(_Body):
    """`POST /v1/perplexity`: sliding-window perplexity of each input under the base, the mixture and the
    memory."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str | None = Field(None, description="The served base model name or a memory name.")
    memory: StrictStr | MemoryList | None = Field(
        None,
        description="A loaded memory's name; null = the base model alone. A list of several distinct names "
        "scores their mixture sum(alpha_i * p_i) + (1 - sum(alpha_i)) * p_base (then `alpha` is required: "
        "one weight per memory).",
    )
    alpha: Alpha | AlphaList | AutoAlpha | None = Field(
        None,
        description="Memory weight(s) in [0, 1]; with one memory a list scores every value in one pass. "
        "Default: the manifest's. With several memories: one weight per memory (one mixture), summing to at "
        "most 1. \"auto\": the memory's learned router sets alpha at every scored token (one memory with a "
        "router).",
    )
    memory_temperature: MemoryTemperature | MemoryTemperatureList | None = Field(
        None,
        description=MEMORY_TEMPERATURE_DOC,
    )
    input: Prompt = Field(..., description=f"The document(s): {PROMPT_DOC}.")
    context_length: StrictInt | None = Field(
        None, ge=2, description="Window length (default min(1024, model context))."
    )
    stride: StrictInt | None = Field(None, ge=1, description="Window step (default half the window).")
    logprobs: StrictInt | None = Field(
        None, ge=0,
        description="Per-token log-probs of every scored token under the base, the memory and the mixture "
        "(first alpha) in `data[i].logprobs`, with each model's top `logprobs` alternatives (0 = none). At "
        f"most {MAX_TOKEN_LOGPROBS} scored tokens per request: score longer texts in parts.",
    )
    first_window: StrictInt = Field(
        0, ge=0,
        description="Score windows from this one (numbered from 0; `num_windows` says how many there are).",
    )
    max_windows: StrictInt | None = Field(
        None, ge=1, description="Score at most this many windows (default: to the end of each input)."
    )


class MemoryLoadBody(_Body):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = Field(..., min_length=1, max_length=MAX_MEMORY_NAME)
    path: str = Field(
        ..., min_length=1, max_length=4096, description="Memory directory (under --memory-root)."
    )
    alpha: StrictFloat | None = Field(
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
    memory: str | list[str] | None = None
    alpha: AlphaEcho = None


class ChatLogprobAlternative(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprobEntry(ChatLogprobAlternative):
    top_logprobs: list[ChatLogprobAlternative]


class ChatLogprobs(BaseModel):
    content: list[ChatLogprobEntry] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None
    stop_reason: str | int | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    memory: str | list[str] | None = None
    alpha: AlphaEcho = None


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int = Field(..., description="The context a request on this model may use.")
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    """The tokenizer's configuration (as vLLM's `/tokenizer_info`): its init arguments, special tokens as
    strings, and the chat template in use."""

    model_config = ConfigDict(extra="allow")
    tokenizer_class: str
    eos_token: str | None = None
    bos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None
    chat_template: str | None = None


class VersionInfo(BaseModel):
    version: str


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


class TokenAlternative(BaseModel):
    token: str = Field(..., description="The token's text, decoded alone.")
    token_id: int
    base: float
    memory: float | None = None
    mixed: float | None = Field(None, description="At the first alpha.")


class PerplexityLogprobs(BaseModel):
    offset: int = Field(
        ..., description="Position in the input of the first entry (0 when the first window was scored)."
    )
    tokens: list[str] = Field(
        ...,
        description="The text each token adds to the decoded input (pieces of any split concatenate to it).",
    )
    token_ids: list[int]
    base: list[float | None] = Field(
        ..., description="log p_base of each token; null for token 0 (no left context)."
    )
    memory: list[float | None] | None = Field(None, description="The memory alone; null without a memory.")
    mixed: list[float | None] | None = Field(
        None, description="The mixture at the first alpha; null without a memory."
    )
    top_logprobs: list[list[TokenAlternative] | None] | None = Field(
        None,
        description="Per token: the base's and the memory's top `logprobs` tokens (distinct, best first "
        "under the mixture), each with both models' log-probs; null when `logprobs` is 0.",
    )


class PerplexityDocument(PerplexityScores):
    index: int
    num_windows: int = Field(
        ..., description="The input's windows in all (the request may have scored a range)."
    )
    logprobs: PerplexityLogprobs | None = Field(None, description="When the request set `logprobs`.")


class PerplexityResponse(BaseModel):
    id: str
    object: Literal["perplexity"] = "perplexity"
    created: int
    model: str
    memory: str | list[str] | None
    alpha: AlphaEcho
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
    temperature: float | None = Field(
        default=None, description="A memory's default memory temperature (its manifest's)."
    )
    tokenizer_verified: bool | None = Field(
        default=None,
        description="A memory's token->id map was compared with the base's (false: it ships neither "
        "tokenizer nor manifest, so only its vocabulary size and special-token ids were checked).",
    )
    router: bool | None = Field(
        default=None,
        description='A memory ships a learned per-token router: requests may ask for "alpha": "auto".',
    )
    format: str = Field(
        default="safetensors", description='How the weights were stored: "safetensors" or "gguf".'
    )
    quantization: str | None = Field(
        default=None, description="A GGUF file's quantization type (Q4_1, Q8_0, F16 …): how the weights were "
        "stored. They are dequantized at load, then run as `serving_quantization` says.",
    )
    serving_quantization: str | None = Field(
        default=None, description='What the linear layers compute in (`--quantization`): "int4" or "int8" '
        "weight-only with bfloat16 activations, or null (the serving dtype).",
    )


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
