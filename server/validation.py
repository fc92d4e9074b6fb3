"""Request limits and the rules every input is checked against, in one place.

The HTTP routes, the CLI, the registry file, the registry, the engine and perplexity jobs call these
functions instead of writing a rule again. Each check raises a MemdecError naming the offending
parameter: InvalidRequestError (400) unless the caller passes another class (the registry refuses with
MemoryLoadError). The α rule itself lives in `memories.mixing.check_alpha`, so that the toolkit's
manifest applies exactly the same one.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from memories.mixing import AUTO_ALPHA, MAX_MEMORIES, Mixture, MixtureError  # noqa: F401 (the mixture's limits, re-exported)
from memories.mixing import check_alpha as _alpha_rule
from memories.mixing import check_temperature as _temperature_rule
from memories.perplexity import WindowSettingsError, window_settings
from server.errors import InvalidRequestError, MemdecError, MemoryLoadError
from server.metrics import RESERVED_MEMORY_LABELS
from server.perplexity import document_windows
from server.request import EMPTY_STOP, GenerationRequest, PerplexityRequest

MAX_PROMPTS = 256  # prompts (or perplexity inputs) in one request, and prompts x n
MAX_STOP = 16  # stop strings per request
MAX_ALPHAS = 32  # alphas in one perplexity request
MAX_MEMORY_NAME = 128  # characters in a memory name
# Scored tokens whose per-token log-probs one perplexity request may return: bounds the answer's size (with
# 20 alternatives per model, a few MB of JSON); longer texts are scored in parts (first_window, max_windows).
MAX_TOKEN_LOGPROBS = 16384
# A request's memory temperature (the memory's logits are divided by it): below this a float32 division can
# overflow, above it the memory is all but uniform.
# Fields that clients send (`vllm bench serve` sends repetition_penalty 1.0; OpenAI's clients send tool
# fields) but that memdec's sampler or chat does not implement: each is accepted at its neutral values only,
# so a request never silently gets something other than what it asked for. null is always neutral.
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "presence_penalty": (0.0,),
    "frequency_penalty": (0.0,),
    "repetition_penalty": (1.0,),
    "min_p": (0.0,),
    "min_tokens": (0,),
    "logit_bias": ({},),
    "suffix": ("",),
    "tools": ([],),
    "tool_choice": ("none", "auto"),  # "auto" with no tools is no tool call
    "response_format": ({"type": "text"},),
    "chat_template": (),  # a request's own template would run client code in the server: never
}
# The metrics use these as label values (the base alone, overflow), so no memory may be called so; nor "auto",
# which asks the server to choose the memory (`"memory": "auto"`).
AUTO_MEMORY = "auto"
RESERVED_MEMORY_NAMES = RESERVED_MEMORY_LABELS | {AUTO_MEMORY}


def check_alpha(alpha: object, param: str = "alpha", error: type[MemdecError] = InvalidRequestError) -> float:
    """α in [0, 1] (`memories.mixing.check_alpha`), as the server's error."""
    try:
        return _alpha_rule(alpha)
    except ValueError as exc:
        raise error(str(exc), param=param) from None


@contextmanager
def mixture_errors() -> Iterator[None]:
    """A mixture's mistake (`memories.mixing.MixtureError`, raised by `Mixture`'s constructor and factories)
    as the server's 400, its message, param and code kept: the one place the server maps them."""
    try:
        yield
    except MixtureError as exc:
        raise InvalidRequestError(str(exc), param=exc.param, code=exc.code) from None


def check_distinct(names: list[str], param: str) -> None:
    """No memory named twice in one list (the first repeated name is reported)."""
    dup = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if dup is not None:
        raise InvalidRequestError(f"memory {dup!r} is named twice in '{param}'", param=param)


def check_memory_temperature(value: float) -> float:
    """A memory temperature in [0.01, 100] (`memories.mixing.check_temperature`), as a 400."""
    try:
        return _temperature_rule(value)
    except ValueError as exc:
        raise InvalidRequestError(f"memory_{exc}", param="memory_temperature") from None


def check_token_ids(ids: Iterable[int], vocab_size: int, param: str, what: str = "token id") -> None:
    """Every id must index the tokenizer's vocabulary: [0, vocab_size)."""
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidRequestError(
            f"{what} {bad} is out of vocabulary (valid ids: 0..{vocab_size - 1})", param=param
        )


def request_context(base_len: int, memory_len: int | None) -> int:
    """The context a request may use: the base's, and no more than its memory's (both models see it all)."""
    return base_len if memory_len is None else min(base_len, memory_len)


def check_context(num_prompt_tokens: int, max_tokens: int, max_len: int) -> None:
    """Prompt plus completion must fit the request's context (vLLM's wording, so clients recognise it)."""
    total = num_prompt_tokens + max_tokens
    if total > max_len:
        raise InvalidRequestError(
            f"This model's maximum context length is {max_len} tokens. However, you requested "
            f"{total} tokens ({num_prompt_tokens} in the messages, {max_tokens} in the completion). "
            "Please reduce the length of the messages or completion.",
            param="max_tokens",
            code="context_length_exceeded",
        )


def check_memory_name(name: str) -> None:
    """Letters, digits, '-', '_' and '.', at most MAX_MEMORY_NAME characters, and not a reserved label."""
    if (not name or len(name) > MAX_MEMORY_NAME
            or not name.replace("-", "").replace("_", "").replace(".", "").isalnum()):
        raise MemoryLoadError(
            f"invalid memory name {name[:MAX_MEMORY_NAME]!r}: use up to {MAX_MEMORY_NAME} letters, digits, "
            "'-', '_' or '.'",
            param="name",
        )
    if name in RESERVED_MEMORY_NAMES:
        raise MemoryLoadError(
            f"memory name {name!r} is reserved (metrics labels for the base alone / overflow, and 'auto', "
            "which asks the server to choose the memory)", param="name",
        )


def check_stop_strings(stop: tuple[str, ...]) -> tuple[str, ...]:
    if len(stop) > MAX_STOP:
        raise InvalidRequestError(f"at most {MAX_STOP} stop strings, got {len(stop)}", param="stop")
    if any(s == "" for s in stop):
        raise InvalidRequestError(EMPTY_STOP, param="stop")
    return stop


def check_at_most(value: int | None, limit: int, param: str) -> None:
    """A configured server limit (`n`, `logprobs`): the schema only knows the value is >= 0."""
    if value is not None and value > limit:
        raise InvalidRequestError(f"{param} must be at most {limit}", param=param)


def check_neutral(fields: Mapping[str, Any]) -> None:
    """Each field (a name of NEUTRAL) is null or one of its neutral values."""
    for name, value in fields.items():
        accepted = NEUTRAL[name]
        if value is not None and value not in accepted:
            allowed = " or ".join(json.dumps(v) for v in (*accepted, None))
            raise InvalidRequestError(
                f"'{name}' is not supported by memdec: only {allowed} is accepted", param=name,
                code="unsupported_parameter",
            )


def check_best_of(best_of: int | None, n: int) -> None:
    if best_of is not None and best_of != n:
        raise InvalidRequestError("'best_of' is not supported (leave it unset or equal to n)",
                                  param="best_of")


def check_stream_options(given: bool, stream: bool) -> None:
    if given and not stream:
        raise InvalidRequestError("'stream_options' needs 'stream': true", param="stream_options")


def check_chat_logprobs(logprobs: bool, top_logprobs: int | None, limit: int) -> int | None:
    """The engine's top-N for a chat request (None: no log-probs), as OpenAI's rule: top_logprobs needs
    logprobs."""
    if top_logprobs is not None and not logprobs:
        raise InvalidRequestError("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    check_at_most(top_logprobs, limit, "top_logprobs")
    return (top_logprobs or 0) if logprobs else None


def check_message_extras(extra: Mapping[str, Any], index: int) -> None:
    """OpenAI message fields memdec has no use for (tool_calls, tool_call_id, refusal, audio ...): only
    empty."""
    for key, value in extra.items():
        if value not in (None, "", [], {}):
            raise InvalidRequestError(
                f"messages[{index}].{key} is not supported by memdec (only null or empty)",
                param="messages", code="unsupported_parameter",
            )


def check_content_part(kind: str, text: str | None, index: int) -> str:
    """One part of a message's content list: text only (memdec serves text models)."""
    if kind != "text":
        raise InvalidRequestError(
            f"messages[{index}].content: only text parts are supported, got a part of type {kind!r}",
            param="messages", code="unsupported_parameter",
        )
    if text is None:
        raise InvalidRequestError(f"messages[{index}].content: a text part needs 'text'", param="messages")
    return text


def check_chat_ending(add_generation_prompt: bool, continue_final_message: bool, last_role: str) -> None:
    """vLLM's rule: open the assistant's turn or continue the final (assistant) message, not both."""
    if add_generation_prompt and continue_final_message:
        raise InvalidRequestError(
            "'continue_final_message' and 'add_generation_prompt' cannot both be true",
            param="continue_final_message",
        )
    if continue_final_message and last_role != "assistant":
        raise InvalidRequestError(
            "'continue_final_message' needs an assistant message last", param="continue_final_message"
        )


def check_template_kwargs(kwargs: Mapping[str, Any], reserved: Iterable[str]) -> None:
    """Extra template variables may not replace the ones the renderer sets (messages, add_generation_prompt
    ...)."""
    taken = sorted(set(kwargs) & set(reserved))
    if taken:
        raise InvalidRequestError(
            f"chat_template_kwargs may not set {', '.join(taken)}: use the request's own fields",
            param="chat_template_kwargs",
        )


def completion_budget(requested: int | None, prompt_tokens: int, max_len: int) -> int:
    """max_tokens of a chat request: as asked, or (OpenAI's and vLLM's default) up to the end of the
    context."""
    if requested is not None:
        return requested
    check_context(prompt_tokens, 1, max_len)  # no room for even one token
    return max_len - prompt_tokens


def validate_generation(request: GenerationRequest, vocab_size: int, max_len: int) -> None:
    """Everything about a generation request that is the client's mistake; `max_len` is
    `request_context(...)` for its memory. Raises before anything is queued or acquired."""
    ids = request.prompt_token_ids
    if not ids:
        raise InvalidRequestError("the prompt must contain at least one token", param="prompt")
    check_token_ids(ids, vocab_size, "prompt")
    check_context(len(ids), request.params.max_tokens, max_len)
    for name, n in (("logprobs", request.params.logprobs),
                    ("prompt_logprobs", request.params.prompt_logprobs)):
        if n is not None and not 0 <= n <= vocab_size:
            raise InvalidRequestError(f"{name} must be in [0, {vocab_size}]", param="logprobs")
    check_token_ids(request.params.stop_token_ids, vocab_size, "stop_token_ids", what="stop token id")


def validate_perplexity(request: PerplexityRequest, vocab_size: int, max_len: int) -> tuple[int, int]:
    """Check a perplexity job against the vocabulary and `max_len` (`request_context(...)`); returns its
    (context_length, stride) with the protocol's defaults filled in."""
    if not request.documents:
        raise InvalidRequestError("input must not be empty", param="input")
    for doc in request.documents:
        if len(doc) < 2:
            raise InvalidRequestError("each input needs at least 2 tokens to be scored", param="input")
        check_token_ids(doc, vocab_size, "input")
    # Each mixture was checked when it was built (`Mixture`): here only how they go together.
    if request.routed and len(request.mixtures) > 1:
        raise InvalidRequestError('"alpha": "auto" takes one memory and no other alpha', param="alpha")
    if request.separately:
        if (len(request.memory_names) != len(request.mixtures)
                or any(len(m.terms) != 1 for m in request.mixtures)):
            raise InvalidRequestError("each memory once, with one alpha each", param="memory")
        if request.token_logprobs is not None:
            raise InvalidRequestError("memories scored separately give no per-token log-probs",
                                      param="logprobs")
    elif len(request.mixtures) > 1 and any(len(m.terms) != 1 for m in request.mixtures):
        raise InvalidRequestError("a sweep of alphas takes one memory", param="alpha")
    elif request.several and request.token_logprobs:
        raise InvalidRequestError(
            "per-token top alternatives ('logprobs' > 0) are not supported with several memories; "
            "'logprobs': 0 returns each token's base and mixed log-probs", param="logprobs",
        )
    if request.token_logprobs is not None and not 0 <= request.token_logprobs <= vocab_size:
        raise InvalidRequestError(f"logprobs must be in [0, {vocab_size}]", param="logprobs")
    if request.first_window < 0:
        raise InvalidRequestError("first_window must be >= 0", param="first_window")
    if request.max_windows is not None and request.max_windows < 1:
        raise InvalidRequestError("max_windows must be >= 1", param="max_windows")
    context, stride = resolve_windows(request.context_length, request.stride, max_len)
    _check_window_range(request, context, stride)
    return context, stride


def _check_window_range(request: PerplexityRequest, context: int, stride: int) -> None:
    """Every document has a window at `first_window`, and per-token answers stay within MAX_TOKEN_LOGPROBS."""
    scored = 0
    for i, doc in enumerate(request.documents):
        windows, total = document_windows(len(doc), context, stride, request.first_window,
                                          request.max_windows)
        if not windows:
            raise InvalidRequestError(
                f"first_window {request.first_window} is past the end of input {i}: it has {total} windows "
                f"(context_length {context}, stride {stride}), numbered from 0",
                param="first_window",
            )
        scored += sum(w.num_scored for w in windows)
    if request.token_logprobs is not None and scored > MAX_TOKEN_LOGPROBS:
        raise InvalidRequestError(
            f"per-token log-probs are limited to {MAX_TOKEN_LOGPROBS} scored tokens per request, this one "
            f"scores {scored}: score the text in parts with first_window and max_windows",
            param="logprobs",
        )


def resolve_windows(context_length: int | None, stride: int | None, max_len: int) -> tuple[int, int]:
    """(context, stride) of the sliding-window protocol (`memories.perplexity.window_settings`) as a 400."""
    try:
        return window_settings(max_len, context_length, stride)
    except WindowSettingsError as exc:
        raise InvalidRequestError(str(exc), param=exc.param) from None
