"""A request's life inside the engine, in token ids: its tokens, slot, stop checks on ids, timings.

Text (detokenisation, stop strings) is not the engine's business: `server.output` turns these
token deltas into text off the engine thread.
"""

from __future__ import annotations

import enum
import itertools
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from server.loader import LoadedModel
from server.request import EngineOutput, FinishReason, GenerationRequest, TokenLogprob

if TYPE_CHECKING:
    from memories.router import Router

_ids = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Timings:
    arrival: float = field(default_factory=time.monotonic)
    scheduled: float | None = None  # first prefill started
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None
    inter_token: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class MemoryUse:
    """One active term of a sequence's mixture, bound to its model (held from the registry while the sequence
    lives) and, for a routed term, its router: α > 0, or 0 with the router's α_t applied when mixing."""

    name: str
    lm: LoadedModel
    alpha: float  # 0 when routed: the router's α_t is applied when mixing, and the base keeps weight 1 here
    temperature: float = 1.0
    router: Router | None = None  # an `"alpha": "auto"` term's router (α per token), else None


class Sequence:
    def __init__(
        self,
        request: GenerationRequest,
        memories: tuple[MemoryUse, ...],
        eos_ids: frozenset[int],
        max_model_len: int,
    ) -> None:
        self.seq_id = next(_ids)
        self.request = request
        self.params = request.params
        # The active terms of its mixture (`Mixture.active`), in request order; empty when the base runs
        # alone.
        self.memories: tuple[MemoryUse, ...] = memories
        self.memory_names: tuple[str, ...] = tuple(m.name for m in self.memories)
        # The base's weight 1 − Σ αᵢ (in float64, clamped: the α's were checked to sum to at most 1).
        self.base_weight = max(0.0, 1.0 - sum(m.alpha for m in self.memories))
        # May the memory draft for the base (when the engine speculates)? Only with one memory at alpha > 0:
        # a row with several memories decodes plainly (speculation drafts from one distribution).
        # Nor with a router ("alpha": "auto"): it decodes plainly (its drafts would be exact, but the
        # acceptance rule's bound and the engine's drafting cost model assume a fixed α; not measured yet).
        self.speculative = request.speculative and len(self.memories) == 1 and self.memories[0].router is None
        # A router with context features ("alpha": "auto"): the engine carries the memory's advantage EMAs for
        # this row, from every prompt position's target log-probs, so the prefix cache cannot serve it
        # (`Scheduler._lookup`).
        self.context_routed = any(m.router is not None and m.router.context_decays for m in self.memories)
        self.spec_passed = 0.0  # its acceptance tests passed and run, decayed (`server.speculative`)
        self.spec_tests = 0.0
        # Every row draws from a seed, so a row's draws never depend on its batch; unseeded requests get a
        # random one.
        self.seed = self.params.seed if self.params.seed is not None else secrets.randbits(63)
        self.token_ids: list[int] = list(request.prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.status = Status.WAITING
        self.slot: int | None = None  # row of every KV table while running
        # Prefill progress (chunked prefill, prefix caching): tokens every model has cached, out of
        # `prefill_len` (its tokens when it was admitted). Decoding starts once they meet.
        self.num_computed = 0
        self.prefill_len = 0
        self.wants_prompt_logprobs = self.params.prompt_logprobs is not None
        self.num_preemptions = 0
        self.timings = Timings()
        self.max_len = min(max_model_len, self.num_prompt_tokens + self.params.max_tokens)
        self._stop_ids = set(self.params.stop_token_ids) | (set() if self.params.ignore_eos else set(eos_ids))
        self._sent_tokens = 0
        self._pending_logprobs: list[TokenLogprob] = []
        self.prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
        self._prompt_logprobs_sent = False
        self.finish_reason: FinishReason | None = None
        self.stop_reason: str | int | None = None
        self.error: str | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def row(self) -> int:
        """The slot of a running sequence: its row in every model's KV tables."""
        assert self.slot is not None, "only a running sequence holds a slot"
        return self.slot

    @property
    def model_keys(self) -> tuple[str | None, ...]:
        """The runner's models this sequence uses: the base (None) and its memories, if any."""
        return (None, *self.memory_names)

    @property
    def memory_name(self) -> str | None:
        """Its memory when it mixes in exactly one (the one that drafts when it speculates), else None."""
        return self.memory_names[0] if len(self.memories) == 1 else None

    @property
    def in_prefill(self) -> bool:
        """Admitted, but its prompt is not wholly in the cache yet (more chunks to run)."""
        return self.slot is not None and self.num_computed < self.prefill_len

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def wants_logprobs(self) -> bool:
        return self.params.logprobs is not None

    def append(self, token: int, logprob: TokenLogprob | None, now: float) -> None:
        """Add a sampled token, then decide whether the sequence is done (stop ids, EOS, length)."""
        timings = self.timings
        if timings.first_token is None:
            timings.first_token = now
        else:
            timings.inter_token.append(now - (timings.last_token or now))
        timings.last_token = now
        self.token_ids.append(token)
        if logprob is not None:
            self._pending_logprobs.append(logprob)
        if token in self._stop_ids:
            self.finish(FinishReason.STOP, stop_reason=token if token in self.params.stop_token_ids else None)
        elif len(self.token_ids) >= self.max_len:
            self.finish(FinishReason.LENGTH)

    def rollback(self, num_tokens: int) -> None:
        """Keep the first `num_tokens` tokens (at least the prompt); later ones are dropped, and re-sent if
        re-made."""
        if not self.num_prompt_tokens <= num_tokens <= len(self.token_ids):
            raise ValueError(f"cannot roll back to {num_tokens} tokens: prompt {self.num_prompt_tokens}, "
                             f"have {len(self.token_ids)}")
        del self.token_ids[num_tokens:]
        self._sent_tokens = min(self._sent_tokens, self.num_output_tokens)

    def finish(self, reason: FinishReason, *, stop_reason: str | int | None = None,
               error: str | None = None) -> None:
        if self.status is Status.FINISHED:
            return
        self.status = Status.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason
        self.error = error
        self.timings.finished = time.monotonic()

    def take_output(self) -> EngineOutput | None:
        """The token delta since the last call, or None when there is nothing new to say."""
        finished = self.is_finished
        new_tokens = tuple(self.token_ids[self.num_prompt_tokens + self._sent_tokens :])
        prompt_lp = None
        if self.prompt_logprobs is not None and not self._prompt_logprobs_sent:
            prompt_lp, self._prompt_logprobs_sent = self.prompt_logprobs, True
        if not (new_tokens or finished or prompt_lp is not None):
            return None
        logprobs = tuple(self._pending_logprobs) if self.wants_logprobs else None
        self._pending_logprobs = []
        self._sent_tokens += len(new_tokens)
        return EngineOutput(
            request_id=self.request_id,
            new_token_ids=new_tokens,
            new_logprobs=logprobs,
            prompt_logprobs=prompt_lp,
            finished=finished,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
            error=self.error,
            num_prompt_tokens=self.num_prompt_tokens,
            num_output_tokens=self.num_output_tokens,
        )
