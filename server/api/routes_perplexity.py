"""`POST /v1/perplexity`: the paper's sliding-window perplexity under the base, the mixture and the memory."""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from memories.mixing import Mixture
from server.api.auth import check_api_key
from server.api.request_metrics import CLIENT_CLOSED, set_finish_reason
from server.api.schemas import PerplexityRequestBody, PerplexityResponse
from server.api.state import ServingState, Target
from server.api.streaming import ClientDisconnected, cancel_on_disconnect
from server.api.token_logprobs import logprobs_object
from server.api.tokens import Prompt, TokenStrings, split_prompts, tokenize
from server.errors import InvalidRequestError
from server.request import PerplexityRequest, PerplexityResult, PerplexityScore
from server.validation import AUTO_ALPHA, AUTO_MEMORY, check_at_most, mixture_errors

router = APIRouter()

_EXP_MAX = 709.0  # exp() of more overflows a float; such a perplexity is "astronomical" either way

DESCRIPTION = """Perplexity of each input, scored the way the Memory Decoder paper does.

Protocol: each input is tokenized with the base tokenizer (or given as token ids) and scored with
sliding windows of `context_length` tokens (default min(1024, model context)) advancing by `stride`
(default half the window); each window scores only tokens no earlier window scored, so every token
after the first is scored exactly once with as much left context as the window allows.

For every input and overall (token-weighted) the answer gives `num_tokens` scored, the mean negative
log-likelihood `nll` (nats per token) and `perplexity = exp(nll)` under the mixture
`alpha * p_memory + (1 - alpha) * p_base`, `base_nll`/`base_perplexity` with the memory off and
`memory_nll`/`memory_perplexity` for the memory alone. `alpha` may be a list: both models run once and
every alpha is scored from the same log-probs; `alphas` then lists one entry per value and the top-level
`nll`/`perplexity` are those of the first. Without a memory only the base is scored.

Several memories (`memory` a list, `alpha` one weight per memory, required, summing to at most 1):
`nll`/`perplexity` are the mixture `sum(alpha_i * p_i) + (1 - sum(alpha_i)) * p_base`; `memory_nll`
is null (there is no one memory alone), and per-token `logprobs` give the base and the mixture
(`logprobs: 0` only: top alternatives are refused).

For an input that fits in one window, `perplexity` equals exp of minus the mean of
`token_logprobs[1:]` from `/v1/completions` with `echo: true, max_tokens: 0, logprobs: 0`.

`alpha: "auto"` (one memory that ships a router): alpha is set at every scored token by the memory's learned
router from both models' distributions there (`alpha` in the answer is "auto"; `alphas` is null).

Per token (`logprobs`): each document's `logprobs` object lists every scored token's log-prob under the
base, the memory alone and the mixture, and with `logprobs: k > 0` each model's top k alternatives with
both models' log-probs, so a client can mix them at any alpha without asking again.

In parts (`first_window`, `max_windows`): only those windows of each input are scored; `num_windows`
says how many it has. Scoring windows 0..k-1, then k..2k-1 and so on gives exactly the whole input's
token log-probs (summing `nll * num_tokens` over the parts gives its totals): a client shows progress on
a long text, and each answer stays small.
"""


def _ppl(nll: float) -> float:
    return math.exp(min(nll, _EXP_MAX))


def _scores(
    base: PerplexityScore,
    mixed: list[PerplexityScore],
    memory_alone: PerplexityScore | None,
    alphas: list[float],
    alpha_is_list: bool,
    several: bool = False,
) -> dict[str, Any]:
    nll = mixed[0].mean_nll if mixed else base.mean_nll
    out: dict[str, Any] = {
        "num_tokens": base.num_tokens,
        "nll": nll,
        "perplexity": _ppl(nll),
        "base_nll": base.mean_nll,
        "base_perplexity": _ppl(base.mean_nll),
        "memory_nll": memory_alone.mean_nll if memory_alone else None,
        "memory_perplexity": _ppl(memory_alone.mean_nll) if memory_alone else None,
        "alphas": None,
    }
    if alpha_is_list and not several:  # several memories: one mixture, `alpha` its weights (not a sweep)
        out["alphas"] = [
            {"alpha": a, "nll": m.mean_nll, "perplexity": _ppl(m.mean_nll)}
            for a, m in zip(alphas, mixed, strict=True)
        ]
    return out


def _documents(
    strings: TokenStrings,
    docs: list[Prompt],
    result: PerplexityResult,
    alphas: list[float],
    alpha_is_list: bool,
    from_start: bool,
    several: bool = False,
) -> list[dict[str, Any]]:
    """The `data` entries (with per-token log-probs, real work for long inputs: run off the event loop)."""
    data = []
    for i, (prompt, doc) in enumerate(zip(docs, result.documents, strict=True)):
        entry = {"index": i,
                 **_scores(doc.base, list(doc.mixed), doc.memory_alone, alphas, alpha_is_list, several)}
        entry["num_windows"] = doc.num_windows
        entry["logprobs"] = (logprobs_object(strings, prompt.token_ids, doc.tokens, from_start) if doc.tokens
                             else None)
        data.append(entry)
    return data


def _mixtures(body: PerplexityRequestBody, target: Target) -> list[Mixture]:
    """The mixtures a request scores, each built and checked once (`Mixture.resolve`): one per α of a sweep on
    one memory (`alpha` a list), else one (several memories: their mixture; `"alpha": "auto"`: the
    router's)."""
    memories = target.memories or ((target.memory,) if target.memory else ())
    with mixture_errors():
        if len(memories) == 1 and isinstance(body.alpha, list) and len(body.alpha) != 1:
            return [Mixture.resolve(memories, a, body.memory_temperature) for a in body.alpha]
        return [Mixture.resolve(memories, body.alpha, body.memory_temperature)]


def _total(scores: list[PerplexityScore]) -> PerplexityScore:
    return PerplexityScore(sum(s.nll for s in scores), sum(s.num_tokens for s in scores))


def _overall(
    result: PerplexityResult, target: Target, alphas: list[float], alpha_is_list: bool, several: bool
) -> dict[str, Any]:
    """The `overall` entry: every document's scores summed, as one document's are reported."""
    docs = result.documents
    with_memory = target.memory is not None or several
    mixed = [_total([d.mixed[k] for d in docs]) for k in range(len(docs[0].mixed))] if with_memory else []
    memory = _total([d.memory_alone for d in docs if d.memory_alone]) if target.memory else None
    return _scores(_total([d.base for d in docs]), mixed, memory, alphas, alpha_is_list, several)


@router.post(
    "/v1/perplexity",
    response_model=None,
    dependencies=[Depends(check_api_key)],
    responses={200: {"model": PerplexityResponse}},
    summary="Sliding-window perplexity under the base, the mixture (one or several alphas) and the memory",
    description=DESCRIPTION,
)
async def perplexity(body: PerplexityRequestBody, request: Request) -> Response:
    state: ServingState = request.app.state.memdec
    serving = state.ready()
    if body.memory == AUTO_MEMORY:
        raise InvalidRequestError(
            '"memory": "auto" chooses a memory for generation; /v1/perplexity scores named memories (a list '
            "scores their mixture)", param="memory",
        )
    target = serving.resolve(body.model, body.memory, "memory" in body.model_fields_set)
    alpha_is_list = isinstance(body.alpha, list)
    mixtures = tuple(m for m in _mixtures(body, target) if m.terms)
    check_at_most(body.logprobs, state.config.max_logprobs, "logprobs")
    docs = await tokenize(serving.base.tokenizer, split_prompts(body.input, "input"), serving.base.vocab_size,
                          "input")
    job = PerplexityRequest(
        request_id=f"ppl-{uuid.uuid4().hex}",
        documents=tuple(d.token_ids for d in docs),
        context_length=body.context_length,
        stride=body.stride,
        first_window=body.first_window,
        max_windows=body.max_windows,
        token_logprobs=body.logprobs,
        mixtures=mixtures,
    )
    routed, several, alphas = job.routed, job.several, list(job.alphas)
    started = time.monotonic()
    try:
        result = await cancel_on_disconnect(request, serving.engine.perplexity(job))
    except ClientDisconnected:
        set_finish_reason(request, "abort")
        return Response(status_code=CLIENT_CLOSED)
    num_tokens = sum(len(d.token_ids) for d in docs)
    # Several memories: a label no memory can have ('+' is not allowed in names), counted as `other`
    # (bounded).
    state.metrics.observe_perplexity("+".join(job.memory_names) or None, time.monotonic() - started,
                                     num_tokens)
    data = await asyncio.to_thread(_documents, serving.token_strings, docs, result, alphas, alpha_is_list,
                                   body.first_window == 0, several)
    with_memory = target.memory is not None or several
    overall = _overall(result, target, alphas, alpha_is_list, several)
    return JSONResponse(
        {
            "id": job.request_id,
            "object": "perplexity",
            "created": int(time.time()),
            "model": target.model,
            "memory": target.memory_field,
            "alpha": (AUTO_ALPHA if routed else (alphas if alpha_is_list or several else alphas[0])
                      if with_memory else None),
            "context_length": result.context_length,
            "stride": result.stride,
            "data": data,
            "overall": overall,
            "usage": {"prompt_tokens": num_tokens, "completion_tokens": 0, "total_tokens": num_tokens},
        }
    )
