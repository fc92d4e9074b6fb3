"""`"memory": "auto"`: the server picks the memory (or none) that gives the request's prompt the lowest NLL.

The prompt is scored before generation, as one perplexity job (the engine's sliding-window protocol, every
candidate on the same windows, the base's forward shared): under the base alone and under each candidate's
own mixture α·p_mem + (1 − α)·p_base at its default α and temperature (the manifest's). The lowest summed NLL
over the prompt's tokens wins; the base alone is a candidate and wins ties, so a memory is never forced on
text it makes worse. With several prompts (a completions list, or n > 1) the NLLs are summed over all of them
and one memory serves the whole request.

Too short to decide: fewer than MIN_AUTO_TOKENS scored tokens run on the base alone. The choice compares mean
NLLs whose gap between in- and out-of-domain mixtures is a fraction of a nat per token, while single tokens'
log-probs vary by several nats: over n tokens the noise of the difference shrinks as 1/√n, and below ~16
tokens (one KV block; a sentence) it is as large as the gap itself, so a choice would be close to a coin flip
and the base alone is the safe answer. (A rule of thumb, not calibrated on the demo models yet.)
"""

from __future__ import annotations

import logging
import uuid

from memories.mixing import Mixture
from server.api.state import Serving, ServingState, Target
from server.api.tokens import Prompt
from server.errors import InvalidRequestError, NotFoundError
from server.registry import MemoryInfo
from server.request import PerplexityRequest
from server.validation import AUTO_MEMORY, check_distinct

log = logging.getLogger(__name__)

MIN_AUTO_TOKENS = 16  # scored prompt tokens (all prompts together) below which "auto" runs the base alone
MAX_CANDIDATES = 64  # names in `memory_candidates`
HEADER = "X-Memdec-Memory"  # the chosen memory's name, or "none" for the base alone


def auto_target(serving: Serving, model: str | None, candidates: list[str] | None, alpha: object,
                temperature: object) -> Target:
    """The Target of a `"memory": "auto"` request: its candidates (default: every loaded memory), checked."""
    if model is not None and serving.model_memory(model) is not None:
        raise InvalidRequestError('`model` names a memory; with "memory": "auto" it is the base (or omitted)',
                                  param="memory")
    if alpha is not None:
        raise InvalidRequestError('\'alpha\' cannot be given with "memory": "auto": each candidate runs at '
                                  "its default alpha", param="alpha")
    if temperature is not None:
        raise InvalidRequestError(
            "'memory_temperature' cannot be given with \"memory\": \"auto\": each candidate uses its own",
            param="memory_temperature",
        )
    if candidates is None:
        infos = tuple(serving.registry.list())
    else:
        if len(candidates) > MAX_CANDIDATES:
            raise InvalidRequestError(f"at most {MAX_CANDIDATES} memory_candidates",
                                      param="memory_candidates")
        check_distinct(candidates, "memory_candidates")
        infos = tuple(_candidate(serving, name) for name in candidates)
    return Target(model or serving.model_name, None, auto=infos)


def _candidate(serving: Serving, name: str) -> MemoryInfo:
    try:
        return serving.registry.get(name)
    except NotFoundError as exc:  # it names `memory`: here the field is memory_candidates
        raise NotFoundError(exc.message, param="memory_candidates", code=exc.code) from None


def check_candidates_field(memory: object, candidates: list[str] | None) -> None:
    if candidates is not None and memory != AUTO_MEMORY:
        raise InvalidRequestError('\'memory_candidates\' needs "memory": "auto"', param="memory_candidates")


async def choose(state: ServingState, target: Target, prompts: list[Prompt]) -> tuple[Target, dict[str, str]]:
    """Score the prompts and settle an auto Target on the winner; returns it and the response headers."""
    serving = state.ready()
    assert target.auto is not None
    candidates = target.auto
    docs = tuple(p.token_ids for p in prompts if len(p.token_ids) >= 2)
    scored = sum(len(d) - 1 for d in docs)
    chosen: MemoryInfo | None = None
    if candidates and scored >= MIN_AUTO_TOKENS:
        job = PerplexityRequest(
            request_id=f"auto-{uuid.uuid4().hex}",
            documents=docs,
            mixtures=tuple(Mixture.one(c.name, c.alpha, c.temperature) for c in candidates),  # each alone
        )
        result = await serving.engine.perplexity(job)
        base_nll = sum(d.base.nll for d in result.documents)
        nlls = [sum(d.mixed[i].nll for d in result.documents) for i in range(len(candidates))]
        best = min(range(len(candidates)), key=lambda i: nlls[i])
        if nlls[best] < base_nll:  # the base alone wins ties
            chosen = candidates[best]
        log.info("auto memory: %s (prompt NLL base %.3f, %s)", chosen.name if chosen else "none", base_nll,
                 ", ".join(f"{c.name} {n:.3f}" for c, n in zip(candidates, nlls, strict=True)))
    state.metrics.auto_memory_chosen(chosen.name if chosen else None)
    return Target(target.model, chosen), {HEADER: chosen.name if chosen else "none"}
