"""A generation request (completions or chat), resolved: the engine requests to run and what was asked.

Both endpoints come through here once they have their prompts (completions tokenizes `prompt`, chat renders
`messages`), so that the target (model, memory, alpha), the sampling parameters, the limits and their errors
are the same whichever shape the prompt came in.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from memories.mixing import Mixture
from server.api.auto import auto_target, check_candidates_field, choose
from server.api.schemas import SamplingRequest, describe_extra
from server.api.state import Serving, ServingState, Target
from server.api.tokens import Prompt, TokenStrings
from server.config import ServerConfig
from server.errors import InvalidRequestError
from server.request import GenerationRequest, SamplingParams
from server.validation import (
    AUTO_MEMORY,
    MAX_PROMPTS,
    check_at_most,
    check_neutral,
    check_stop_strings,
    check_stream_options,
    completion_budget,
    mixture_errors,
)

log = logging.getLogger(__name__)

# SamplingRequest's fields that only take neutral values (`server.validation.NEUTRAL`).
_NEUTRAL_FIELDS = ("presence_penalty", "frequency_penalty", "repetition_penalty", "min_p", "min_tokens",
                   "logit_bias")


@dataclass(frozen=True)
class Asked:
    """What an endpoint's own fields ask of the engine, beyond the shared ones."""

    max_tokens: int | None  # None: up to the end of the context (chat's default)
    logprobs: int | None  # top-N per generated token; None: no log-probs
    prompt_logprobs: int | None = None  # the same for every prompt token (completions' echo)


@dataclass
class Plan:
    """One HTTP generation request, resolved: what to run and what the answer needs to know."""

    id: str
    created: int
    target: Target
    mixture: Mixture  # every request of the plan mixes this
    prompts: list[Prompt]
    requests: list[GenerationRequest]  # choice index i = prompt (i // n), sample (i % n)
    n: int
    strings: TokenStrings
    prompt_texts: dict[int, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)  # extra response headers (the "auto" memory choice)
    finish_reasons: dict[int, str] = field(default_factory=dict)  # choice index -> reason, as they finish

    def prompt_of(self, choice: int) -> Prompt:
        return self.prompts[choice // self.n]

    def prompt_text(self, choice: int) -> str:
        p = choice // self.n
        if p not in self.prompt_texts:
            prompt = self.prompts[p]
            self.prompt_texts[p] = (prompt.text if prompt.text is not None
                                    else self.strings.decode(prompt.token_ids))
        return self.prompt_texts[p]

    def header(self, object_name: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": object_name,
            "created": self.created,
            "model": self.target.model,
            "memory": self.target.memory_field,
            "alpha": self.mixture.alpha_field,
        }

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p.token_ids) for p in self.prompts)


def check_sampling(body: SamplingRequest, config: ServerConfig) -> None:
    """What the schema cannot say about the shared fields: neutral-only fields and configured limits."""
    check_neutral({name: getattr(body, name) for name in _NEUTRAL_FIELDS})
    check_at_most(body.n, config.max_n, "n")
    check_stream_options(body.stream_options is not None, body.stream)


# a request's target and mixture (empty for `"memory": "auto"` until settled)
Resolved = tuple[Target, Mixture]


def resolve_target(body: SamplingRequest, serving: Serving) -> Resolved:
    """The model and memory (or memories) a request runs on, and its mixture, built and checked here once. A
    `"memory": "auto"` target is settled by `settle` once the prompts are known."""
    check_candidates_field(body.memory, body.memory_candidates)
    if body.memory == AUTO_MEMORY:
        return (auto_target(serving, body.model, body.memory_candidates, body.alpha, body.memory_temperature),
                Mixture())
    target = serving.resolve(body.model, body.memory, "memory" in body.model_fields_set)
    memories = target.memories or ((target.memory,) if target.memory else ())
    with mixture_errors():
        return target, Mixture.resolve(memories, body.alpha, body.memory_temperature)


async def settle(state: ServingState, resolved: Resolved,
                 prompts: list[Prompt]) -> tuple[Resolved, dict[str, str]]:
    """An auto target becomes the chosen memory at its default α and temperature (or the base alone); others
    pass as they are. Returns the resolved target and the headers the response carries."""
    target, _ = resolved
    if target.auto is None:
        return resolved, {}
    chosen, headers = await choose(state, target, prompts)
    memory = chosen.memory
    return (chosen, Mixture.one(memory.name, memory.alpha, memory.temperature) if memory
            else Mixture()), headers


def _params(body: SamplingRequest, asked: Asked, seed: int | None, vocab: int,
            max_tokens: int) -> SamplingParams:
    """The engine's sampling parameters, OpenAI's defaults filled in. A temperature too small to divide by
    is greedy (`SamplingParams.greedy` decides, in one place)."""
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    top_k = body.top_k or 0
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=0 if top_k < 0 or top_k >= vocab else top_k,  # k >= vocabulary keeps everything: off
        seed=seed,
        stop=check_stop_strings(stop),
        stop_token_ids=tuple(body.stop_token_ids or ()),
        ignore_eos=body.ignore_eos,
        logprobs=asked.logprobs,
        prompt_logprobs=asked.prompt_logprobs,
    )


def check_prompt_count(prompts: int, n: int) -> None:
    if prompts * n > MAX_PROMPTS:
        raise InvalidRequestError(f"prompts x n must be at most {MAX_PROMPTS}, got {prompts} x {n}",
                                  param="n")


def build_plan(
    body: SamplingRequest,
    serving: Serving,
    config: ServerConfig,
    resolved: Resolved,
    prompts: list[Prompt],
    asked: Asked,
    id_prefix: str,
) -> Plan:
    """Engine requests for every prompt x sample (`resolved`: `resolve_target`'s answer, found before the
    prompts were tokenized); sample j of every prompt uses seed + j."""
    check_prompt_count(len(prompts), body.n)
    target, mixture = resolved
    context = serving.context_of(target.memory, *target.memories)
    request_id = f"{id_prefix}-{uuid.uuid4().hex}"
    requests = []
    for p, prompt in enumerate(prompts):
        max_tokens = completion_budget(asked.max_tokens, len(prompt.token_ids), context)
        for j in range(body.n):
            seed = None if body.seed is None else body.seed + j
            requests.append(
                GenerationRequest(
                    request_id=f"{request_id}-{p * body.n + j}",
                    prompt_token_ids=prompt.token_ids,
                    params=_params(body, asked, seed, serving.base.vocab_size, max_tokens),
                    mixture=mixture,
                    speculative=body.speculative,
                )
            )
    _log_plan(request_id, body, prompts, requests[0], config.log_prompts)
    return Plan(request_id, int(time.time()), target, mixture, prompts, requests, body.n,
                serving.token_strings)


def _log_plan(request_id: str, body: SamplingRequest, prompts: list[Prompt], first: GenerationRequest,
              log_prompts: bool) -> None:
    extra = describe_extra(body)
    if extra:
        log.warning("%s: ignored unknown fields %s", request_id, extra)
    log.info(
        "%s: %d prompt(s), %d tokens, n=%d, max_tokens=%s, memory=%s, alpha=%s, stream=%s",
        request_id, len(prompts), sum(len(p.token_ids) for p in prompts), body.n, first.params.max_tokens,
        first.mixture.names or None, first.mixture.alpha_field, body.stream,
    )  # fmt: skip  # one line per log argument would hide the message
    if log_prompts:
        log.info("%s: prompts %r", request_id,
                 [p.text if p.text is not None else list(p.token_ids) for p in prompts])
