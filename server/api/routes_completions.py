"""`POST /v1/completions`: OpenAI legacy completions (as vLLM serves them) with `memory` and `alpha`.

Prompts are tokenized here; planning, running and answering are shared with chat (`generation`,
`responses`); this module gives the shape of a text-completion choice.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from server.api.auth import check_api_key
from server.api.generation import (
    Asked,
    Plan,
    build_plan,
    check_prompt_count,
    check_sampling,
    resolve_target,
    settle,
)
from server.api.responses import ChoiceResult, Cursor, finish_reason, respond
from server.api.schemas import CompletionRequest, CompletionResponse
from server.api.state import ServingState
from server.api.tokens import LogprobsBuilder, split_prompts, tokenize
from server.request import RequestOutput
from server.validation import check_at_most, check_best_of, check_neutral

router = APIRouter()


class TextCompletionFormat:
    """Choices with `text` (the prompt first with `echo`) and OpenAI's legacy `logprobs` object."""

    object = "text_completion"
    chunk_object = "text_completion"

    def __init__(self, body: CompletionRequest) -> None:
        self.body = body

    def _builder(self, plan: Plan, offset: int = 0) -> LogprobsBuilder | None:
        if self.body.logprobs is None:
            return None
        return LogprobsBuilder(plan.strings, self.body.logprobs, offset,
                               as_ids=self.body.return_tokens_as_token_ids)

    def choice(self, plan: Plan, i: int, result: ChoiceResult) -> dict[str, Any]:
        builder = self._builder(plan)
        if builder is not None:
            if self.body.echo:
                builder.add(plan.prompt_of(i).token_ids, result.prompt_logprobs)
            builder.add(result.token_ids, result.logprobs)
        text = plan.prompt_text(i) + result.text if self.body.echo else result.text
        return {
            "index": i,
            "text": text,
            "logprobs": builder.take() if builder is not None else None,
            "finish_reason": finish_reason(result.last),
            "stop_reason": result.last.stop_reason,
        }

    def delta(self, plan: Plan, i: int, out: RequestOutput, cursor: Cursor) -> dict[str, Any] | None:
        text = out.new_text
        builder = self._builder(plan, cursor.emitted)
        if not cursor.started:
            cursor.started = True
            if self.body.echo:
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
            "finish_reason": finish_reason(out) if out.finished else None,
            "stop_reason": out.stop_reason if out.finished else None,
        }


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
    serving = state.ready()
    check_sampling(body, state.config)
    check_neutral({"suffix": body.suffix})
    check_best_of(body.best_of, body.n)
    check_at_most(body.logprobs, state.config.max_logprobs, "logprobs")
    resolved = resolve_target(body, serving)
    raw = split_prompts(body.prompt, "prompt")
    check_prompt_count(len(raw), body.n)  # before tokenizing up to 256 prompts for nothing
    prompts = await tokenize(serving.base.tokenizer, raw, serving.base.vocab_size, "prompt")
    resolved, headers = await settle(state, resolved, prompts)
    asked = Asked(
        max_tokens=16 if body.max_tokens is None else body.max_tokens,
        logprobs=body.logprobs,
        prompt_logprobs=body.logprobs if body.echo else None,
    )
    plan = build_plan(body, serving, state.config, resolved, prompts, asked, "cmpl")
    plan.headers = headers
    return await respond(plan, state, request, TextCompletionFormat(body), body.stream, body.stream_options)
