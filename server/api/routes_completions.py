"""`POST /v1/completions`: OpenAI legacy completions (as vLLM serves them) with `memory` and `alpha`."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from server.api.auth import check_api_key
from server.api.errors import as_memdec_error, memdec_error_body
from server.api.request_metrics import CLIENT_CLOSED, set_finish_reason, summarize
from server.api.schemas import CompletionRequest, CompletionResponse, describe_extra
from server.api.state import ServingState, Target
from server.api.streaming import (
    DONE_FRAME,
    ClientDisconnected,
    EngineStream,
    EngineStreamingResponse,
    cancel_on_disconnect,
    merge,
    open_streams,
    sse_frame,
)
from server.api.tokens import LogprobsBuilder, Prompt, TokenStrings, split_prompts, tokenize
from server.config import ServerConfig
from server.errors import InvalidRequestError, MemdecError
from server.request import FinishReason, GenerationRequest, RequestOutput, SamplingParams
from server.validation import MAX_PROMPTS, check_at_most, check_stop_strings

log = logging.getLogger(__name__)
router = APIRouter()


@dataclass
class _Plan:
    """One HTTP completion request, resolved: what to run and how to answer."""

    id: str
    created: int
    target: Target
    alpha: float | None
    prompts: list[Prompt]
    requests: list[GenerationRequest]  # choice index i = prompt (i // n), sample (i % n)
    n: int
    body: CompletionRequest
    strings: TokenStrings
    prompt_texts: dict[int, str] = field(default_factory=dict)
    finish_reasons: dict[int, str] = field(default_factory=dict)  # choice index -> reason, as they finish

    def prompt_of(self, choice: int) -> Prompt:
        return self.prompts[choice // self.n]

    def prompt_text(self, choice: int) -> str:
        p = choice // self.n
        if p not in self.prompt_texts:
            prompt = self.prompts[p]
            self.prompt_texts[p] = prompt.text if prompt.text is not None else self.strings.decode(prompt.token_ids)
        return self.prompt_texts[p]

    def header(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.target.model,
            "memory": self.target.memory.name if self.target.memory else None,
            "alpha": self.alpha,
        }

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p.token_ids) for p in self.prompts)


def _check_unsupported(body: CompletionRequest) -> None:
    if body.presence_penalty or body.frequency_penalty:
        param = "presence_penalty" if body.presence_penalty else "frequency_penalty"
        raise InvalidRequestError(f"'{param}' is not supported (only 0)", param=param)
    if body.logit_bias:
        raise InvalidRequestError("'logit_bias' is not supported", param="logit_bias")
    if body.suffix:
        raise InvalidRequestError("'suffix' is not supported", param="suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise InvalidRequestError("'best_of' is not supported (leave it unset or equal to n)", param="best_of")


def _params(body: CompletionRequest, seed: int | None, vocab: int) -> SamplingParams:
    """The engine's sampling parameters, OpenAI's defaults filled in. A temperature too small to divide by
    is greedy (`SamplingParams.greedy` decides, in one place)."""
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    top_k = body.top_k or 0
    return SamplingParams(
        max_tokens=16 if body.max_tokens is None else body.max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=0 if top_k < 0 or top_k >= vocab else top_k,  # k >= vocabulary keeps everything: off
        seed=seed,
        stop=check_stop_strings(stop),
        stop_token_ids=tuple(body.stop_token_ids or ()),
        ignore_eos=body.ignore_eos,
        logprobs=body.logprobs,
        prompt_logprobs=body.logprobs if body.echo else None,
    )


def _check_body(body: CompletionRequest, config: ServerConfig) -> None:
    """What the schema cannot say: unsupported fields and the server's configured limits."""
    _check_unsupported(body)
    check_at_most(body.n, config.max_n, "n")
    check_at_most(body.logprobs, config.max_logprobs, "logprobs")
    if body.stream_options is not None and not body.stream:
        raise InvalidRequestError("'stream_options' needs 'stream': true", param="stream_options")


async def _plan(body: CompletionRequest, state: ServingState) -> _Plan:
    serving = state.ready()
    _check_body(body, state.config)
    vocab = serving.base.vocab_size
    params = [_params(body, None if body.seed is None else body.seed + j, vocab) for j in range(body.n)]
    target = serving.resolve(body.model, body.memory, "memory" in body.model_fields_set)
    if target.memory is None and body.alpha is not None:
        raise InvalidRequestError("'alpha' needs a memory ('memory' or a memory as 'model')", param="alpha")
    alpha = None if target.memory is None else (target.memory.alpha if body.alpha is None else body.alpha)
    raw = split_prompts(body.prompt, "prompt")
    if len(raw) * body.n > MAX_PROMPTS:
        raise InvalidRequestError(
            f"prompts x n must be at most {MAX_PROMPTS}, got {len(raw)} x {body.n}", param="n"
        )
    prompts = await tokenize(serving.base.tokenizer, raw, vocab, "prompt")
    request_id = f"cmpl-{uuid.uuid4().hex}"
    requests = [
        GenerationRequest(
            request_id=f"{request_id}-{p * body.n + j}",
            prompt_token_ids=prompt.token_ids,
            params=params[j],
            memory=target.memory.name if target.memory else None,
            alpha=alpha or 0.0,
            speculative=body.speculative,
        )
        for p, prompt in enumerate(prompts)
        for j in range(body.n)
    ]
    _log_plan(request_id, body, prompts, requests[0], state.config.log_prompts)
    return _Plan(request_id, int(time.time()), target, alpha, prompts, requests, body.n, body, serving.token_strings)


def _log_plan(request_id: str, body: CompletionRequest, prompts: list[Prompt], first: GenerationRequest,
              log_prompts: bool) -> None:  # fmt: skip
    extra = describe_extra(body)
    if extra:
        log.warning("%s: ignored unknown fields %s", request_id, extra)
    log.info(
        "%s: %d prompt(s), %d tokens, n=%d, max_tokens=%s, memory=%s, alpha=%s, stream=%s",
        request_id, len(prompts), sum(len(p.token_ids) for p in prompts), body.n, first.params.max_tokens,
        first.memory, first.alpha if first.memory else None, body.stream,
    )  # fmt: skip
    if log_prompts:
        log.info("%s: prompts %r", request_id, [p.text if p.text is not None else list(p.token_ids) for p in prompts])


def _finish_reason(out: RequestOutput) -> str | None:
    return out.finish_reason.value if out.finish_reason is not None else None


def _engine_failure(out: RequestOutput) -> MemdecError:
    return MemdecError(f"the engine failed this request: {out.error or 'unknown error'}", code="engine_error")


# -- non-streaming ---------------------------------------------------------------------------------


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Any] = field(default_factory=list)
    prompt_logprobs: tuple | None = None
    last: RequestOutput | None = None


async def _collect(plan: _Plan, streams: list[EngineStream]) -> dict[str, Any]:
    choices = [_Choice() for _ in streams]
    async for i, out in merge(streams):
        c = choices[i]
        if out.prompt_logprobs is not None:
            c.prompt_logprobs = out.prompt_logprobs
        c.text.append(out.new_text)
        c.token_ids.extend(out.new_token_ids)
        if out.new_logprobs:
            c.logprobs.extend(out.new_logprobs)
        if out.finished:
            plan.finish_reasons[i] = _finish_reason(out) or FinishReason.ERROR.value
            if out.finish_reason is FinishReason.ERROR:
                raise _engine_failure(out)
            c.last = out
    body = plan.body
    result = []
    completion_tokens = 0
    for i, c in enumerate(choices):
        assert c.last is not None
        completion_tokens += c.last.num_output_tokens
        text = "".join(c.text)
        logprobs = None
        if body.logprobs is not None:
            builder = LogprobsBuilder(plan.strings, body.logprobs, as_ids=body.return_tokens_as_token_ids)
            if body.echo:
                builder.add(plan.prompt_of(i).token_ids, c.prompt_logprobs)
            builder.add(c.token_ids, c.logprobs)
            logprobs = builder.take()
        if body.echo:
            text = plan.prompt_text(i) + text
        result.append(
            {
                "index": i,
                "text": text,
                "logprobs": logprobs,
                "finish_reason": _finish_reason(c.last),
                "stop_reason": c.last.stop_reason,
            }
        )
    return {**plan.header(), "choices": result, "usage": _usage(plan.prompt_tokens, completion_tokens)}


async def _run(plan: _Plan, state: ServingState) -> dict[str, Any]:
    streams = await open_streams(state.ready().engine.generate, plan.requests)
    return await _collect(plan, streams)


# -- streaming -------------------------------------------------------------------------------------


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


@dataclass
class _Cursor:
    """One streamed choice: characters sent so far (its `text_offset` continues from there), and whether
    its first chunk (which carries the echoed prompt) went out."""

    emitted: int = 0
    started: bool = False


def _stream_choice(plan: _Plan, i: int, out: RequestOutput, cursor: _Cursor) -> dict[str, Any] | None:
    """The `choices` entry of one output delta; None when it has nothing to say."""
    body = plan.body
    text = out.new_text
    builder = None
    if body.logprobs is not None:
        builder = LogprobsBuilder(plan.strings, body.logprobs, cursor.emitted, as_ids=body.return_tokens_as_token_ids)
    if not cursor.started:
        cursor.started = True
        if body.echo:
            if builder is not None:
                builder.add(plan.prompt_of(i).token_ids, out.prompt_logprobs)
            text = plan.prompt_text(i) + text
    if builder is not None:
        builder.add(out.new_token_ids, out.new_logprobs)
    if not (text or out.new_token_ids or out.finished):
        return None
    cursor.emitted += len(text)
    return {
        "index": i,
        "text": text,
        "logprobs": builder.take() if builder is not None else None,
        "finish_reason": _finish_reason(out) if out.finished else None,
        "stop_reason": out.stop_reason if out.finished else None,
    }


async def _sse(plan: _Plan, streams: list[EngineStream], request: Request) -> AsyncIterator[bytes]:
    options = plan.body.stream_options
    include_usage = bool(options and options.include_usage)
    continuous = bool(options and options.continuous_usage_stats)
    header = plan.header()
    cursors = [_Cursor() for _ in streams]
    completion_tokens = [0] * len(streams)
    try:
        async for i, out in merge(streams):
            if out.finished:
                plan.finish_reasons[i] = _finish_reason(out) or FinishReason.ERROR.value
            if out.finish_reason is FinishReason.ERROR:
                raise _engine_failure(out)
            completion_tokens[i] = out.num_output_tokens
            choice = _stream_choice(plan, i, out, cursors[i])
            if choice is None:
                continue
            chunk: dict[str, Any] = {**header, "choices": [choice]}
            if continuous:
                chunk["usage"] = _usage(len(plan.prompt_of(i).token_ids), out.num_output_tokens)
            elif include_usage:
                chunk["usage"] = None
            yield sse_frame(chunk)
        if include_usage:
            yield sse_frame({**header, "choices": [], "usage": _usage(plan.prompt_tokens, sum(completion_tokens))})
        reason = summarize(plan.finish_reasons.values())
    except Exception as exc:  # noqa: BLE001 - after the 200 an error can only travel as a frame
        reason = FinishReason.ERROR.value
        yield sse_frame(memdec_error_body(as_memdec_error(exc)))
    set_finish_reason(request, reason)  # before the final chunk, when the request is counted
    yield DONE_FRAME


@router.post(
    "/v1/completions",
    response_model=None,
    dependencies=[Depends(check_api_key)],
    responses={200: {"model": CompletionResponse, "content": {"text/event-stream": {}}}},
    summary="Create a completion (OpenAI legacy completions, with memdec's memory and alpha)",
)
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    """OpenAI's legacy completions as vLLM implements them, plus `memory` and `alpha`.

    The next-token distribution is `alpha * p_memory + (1 - alpha) * p_base`. `logprobs` are top-N
    log-probs of that mixed distribution. `echo: true` with `max_tokens: 0` and `logprobs: N` returns
    the prompt's log-probs with `token_logprobs[0] = null` (how evaluation harnesses score text).
    With `stream: true` the answer is server-sent events `data: {json}` ending with `data: [DONE]`;
    an error after the stream began arrives as a `data: {"error": {...}}` frame before `[DONE]`.
    """
    state: ServingState = request.app.state.memdec
    plan = await _plan(body, state)
    try:
        if not body.stream:
            try:
                result = await cancel_on_disconnect(request, _run(plan, state))
            finally:
                set_finish_reason(request, summarize(plan.finish_reasons.values()))
            return JSONResponse(result)
        engine = state.ready().engine  # again: shutdown may have begun while the prompts were tokenized
        streams = await cancel_on_disconnect(request, open_streams(engine.generate, plan.requests))
    except ClientDisconnected:
        log.info("%s: client disconnected; request aborted", plan.id)
        set_finish_reason(request, FinishReason.ABORT.value)
        return Response(status_code=CLIENT_CLOSED)
    return EngineStreamingResponse(
        _sse(plan, streams, request), streams, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
