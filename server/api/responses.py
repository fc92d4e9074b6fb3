"""Running a generation plan and answering it: one JSON body, or server-sent events ending `data: [DONE]`.

Completions and chat differ only in the shape of a choice (`text` or `message`/`delta`, and their logprobs
objects), which a `ChoiceFormat` gives; everything else is shared: engine streams, disconnects, engine
errors (a 500 before the answer begins, an error frame after), usage and the finish reason the request
metrics count.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from server.api.errors import as_memdec_error, memdec_error_body
from server.api.generation import Plan
from server.api.request_metrics import CLIENT_CLOSED, set_finish_reason, summarize
from server.api.schemas import StreamOptions
from server.api.state import ServingState
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
from server.errors import MemdecError
from server.request import FinishReason, RequestOutput, TokenLogprob

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChoiceResult:
    """One choice's whole output, gathered for a non-streamed answer."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None
    last: RequestOutput  # its final output (finish reason, token counts)


@dataclass
class Cursor:
    """One streamed choice so far: characters sent (completions' `text_offset` continues from there; chat has
    no use for it), and whether its first chunk (which carries the echoed prompt, or chat's role) went out."""

    emitted: int = 0
    started: bool = False


class ChoiceFormat(Protocol):
    """The shape of an endpoint's choices."""

    object: str  # `object` of a whole answer
    chunk_object: str  # `object` of a streamed chunk

    def choice(self, plan: Plan, i: int, result: ChoiceResult) -> dict[str, Any]:
        """The `choices` entry of a non-streamed answer."""
        ...

    def delta(self, plan: Plan, i: int, out: RequestOutput, cursor: Cursor) -> dict[str, Any] | None:
        """The `choices` entry of one streamed output; None when it has nothing to say."""
        ...


def finish_reason(out: RequestOutput) -> str | None:
    return out.finish_reason.value if out.finish_reason is not None else None


def _engine_failure(out: RequestOutput) -> MemdecError:
    return MemdecError(f"the engine failed this request: {out.error or 'unknown error'}", code="engine_error")


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


@dataclass
class _Gathered:
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    last: RequestOutput | None = None


async def _collect(plan: Plan, streams: list[EngineStream], fmt: ChoiceFormat) -> dict[str, Any]:
    gathered = [_Gathered() for _ in streams]
    async for i, out in merge(streams):
        g = gathered[i]
        if out.prompt_logprobs is not None:
            g.prompt_logprobs = out.prompt_logprobs
        g.text.append(out.new_text)
        g.token_ids.extend(out.new_token_ids)
        if out.new_logprobs:
            g.logprobs.extend(out.new_logprobs)
        if out.finished:
            plan.finish_reasons[i] = finish_reason(out) or FinishReason.ERROR.value
            if out.finish_reason is FinishReason.ERROR:
                raise _engine_failure(out)
            g.last = out
    choices = []
    completion_tokens = 0
    for i, g in enumerate(gathered):
        assert g.last is not None  # merge() returns only once every stream finished
        completion_tokens += g.last.num_output_tokens
        result = ChoiceResult("".join(g.text), g.token_ids, g.logprobs, g.prompt_logprobs, g.last)
        choices.append(fmt.choice(plan, i, result))
    return {**plan.header(fmt.object), "choices": choices,
            "usage": usage(plan.prompt_tokens, completion_tokens)}


async def _run(plan: Plan, state: ServingState, fmt: ChoiceFormat) -> dict[str, Any]:
    streams = await open_streams(state.ready().engine.generate, plan.requests)
    return await _collect(plan, streams, fmt)


async def _sse(
    plan: Plan, streams: list[EngineStream], request: Request, fmt: ChoiceFormat,
    options: StreamOptions | None,
) -> AsyncIterator[bytes]:
    include_usage = bool(options and options.include_usage)
    continuous = bool(options and options.continuous_usage_stats)
    header = plan.header(fmt.chunk_object)
    cursors = [Cursor() for _ in streams]
    completion_tokens = [0] * len(streams)
    try:
        async for i, out in merge(streams):
            if out.finished:
                plan.finish_reasons[i] = finish_reason(out) or FinishReason.ERROR.value
            if out.finish_reason is FinishReason.ERROR:
                raise _engine_failure(out)
            completion_tokens[i] = out.num_output_tokens
            choice = fmt.delta(plan, i, out, cursors[i])
            if choice is None:
                continue
            chunk: dict[str, Any] = {**header, "choices": [choice]}
            if continuous:
                chunk["usage"] = usage(len(plan.prompt_of(i).token_ids), out.num_output_tokens)
            elif include_usage:
                chunk["usage"] = None
            yield sse_frame(chunk)
        if include_usage:
            yield sse_frame({**header, "choices": [],
                             "usage": usage(plan.prompt_tokens, sum(completion_tokens))})
        reason = summarize(plan.finish_reasons.values())
    except Exception as exc:  # noqa: BLE001 - after the 200 an error can only travel as a frame
        reason = FinishReason.ERROR.value
        yield sse_frame(memdec_error_body(as_memdec_error(exc)))
    set_finish_reason(request, reason)  # before the final chunk, when the request is counted
    yield DONE_FRAME


async def respond(
    plan: Plan, state: ServingState, request: Request, fmt: ChoiceFormat, stream: bool,
    options: StreamOptions | None,
) -> Response:
    """Run the plan and answer: JSON, or SSE when `stream`. A client that leaves first aborts the work."""
    try:
        if not stream:
            try:
                result = await cancel_on_disconnect(request, _run(plan, state, fmt))
            finally:
                set_finish_reason(request, summarize(plan.finish_reasons.values()))
            return JSONResponse(result, headers=plan.headers)
        engine = state.ready().engine  # again: shutdown may have begun while the prompts were tokenized
        streams = await cancel_on_disconnect(request, open_streams(engine.generate, plan.requests))
    except ClientDisconnected:
        log.info("%s: client disconnected; request aborted", plan.id)
        set_finish_reason(request, FinishReason.ABORT.value)
        return Response(status_code=CLIENT_CLOSED)
    return EngineStreamingResponse(
        _sse(plan, streams, request, fmt, options), streams,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **plan.headers},
    )
