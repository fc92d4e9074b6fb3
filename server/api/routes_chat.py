"""`POST /v1/chat/completions`: OpenAI chat completions (as vLLM serves them) with `memory` and `alpha`.

The messages become one prompt through the chat template (`chat_template`); from there the request is
planned, run and answered by the same code as a completion (`generation`, `responses`), so it has the same
sampling, limits, errors and metrics. This module gives the shape of a chat choice.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from server.api.auth import check_api_key
from server.api.chat_template import chat_prompt
from server.api.generation import Asked, Plan, build_plan, check_sampling, resolve_target, settle
from server.api.responses import ChoiceResult, Cursor, finish_reason, respond
from server.api.schemas import ChatCompletionRequest, ChatCompletionResponse
from server.api.state import ServingState
from server.api.tokens import ChatLogprobsBuilder
from server.request import RequestOutput, TokenLogprob
from server.validation import check_chat_logprobs, check_neutral

router = APIRouter()


class ChatFormat:
    """Choices with an assistant `message` (streamed: `delta`s, the first one carrying the role) and chat's
    `logprobs: {"content": [...]}`."""

    object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def __init__(self, top_logprobs: int | None, as_ids: bool) -> None:
        self.top_logprobs = top_logprobs  # None: no log-probs
        self.as_ids = as_ids

    def _logprobs(
        self, plan: Plan, token_ids: Sequence[int], entries: Sequence[TokenLogprob] | None
    ) -> dict[str, Any] | None:
        if self.top_logprobs is None:
            return None
        builder = ChatLogprobsBuilder(plan.strings, self.top_logprobs, as_ids=self.as_ids)
        builder.add(token_ids, entries)
        return builder.take()

    def choice(self, plan: Plan, i: int, result: ChoiceResult) -> dict[str, Any]:
        return {
            "index": i,
            "message": {"role": "assistant", "content": result.text},
            "logprobs": self._logprobs(plan, result.token_ids, result.logprobs),
            "finish_reason": finish_reason(result.last),
            "stop_reason": result.last.stop_reason,
        }

    def delta(self, plan: Plan, i: int, out: RequestOutput, cursor: Cursor) -> dict[str, Any] | None:
        delta: dict[str, Any] = {}
        if not cursor.started:
            cursor.started = True
            delta["role"] = "assistant"
        if out.new_text or delta:
            delta["content"] = out.new_text
        if not (delta or out.new_token_ids or out.finished):
            return None
        return {
            "index": i,
            "delta": delta,
            "logprobs": self._logprobs(plan, out.new_token_ids, out.new_logprobs),
            "finish_reason": finish_reason(out) if out.finished else None,
            "stop_reason": out.stop_reason if out.finished else None,
        }


@router.post(
    "/v1/chat/completions",
    response_model=None,
    dependencies=[Depends(check_api_key)],
    responses={200: {"model": ChatCompletionResponse, "content": {"text/event-stream": {}}}},
    summary="Create a chat completion (OpenAI chat completions, with memdec's memory and alpha)",
)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    """OpenAI's chat completions as vLLM implements them, plus `memory` and `alpha`.

    The messages are rendered by the chat template (`--chat-template FILE`, else the tokenizer's; a 400
    when there is none) and generation continues from there, under `alpha * p_memory + (1 - alpha) * p_base`
    like a completion. `max_completion_tokens` (or `max_tokens`) defaults to the rest of the context.
    `logprobs` with `top_logprobs: N` gives each generated token's log-prob and its top N alternatives.
    With `stream: true`: chunks with `delta`s, as completions stream.
    """
    state: ServingState = request.app.state.memdec
    serving = state.ready()
    check_sampling(body, state.config)
    check_neutral({"tools": body.tools, "tool_choice": body.tool_choice,
                   "response_format": body.response_format})
    top = check_chat_logprobs(body.logprobs, body.top_logprobs, state.config.max_logprobs)
    resolved = resolve_target(body, serving)
    tokenizer = serving.base.tokenizer
    prompt = await chat_prompt(tokenizer, serving.chat_template, body.messages, body, body.add_special_tokens)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    resolved, headers = await settle(state, resolved, [prompt])
    plan = build_plan(body, serving, state.config, resolved, [prompt], Asked(max_tokens, top), "chatcmpl")
    plan.headers = headers
    fmt = ChatFormat(top, body.return_tokens_as_token_ids)
    return await respond(plan, state, request, fmt, body.stream, body.stream_options)
