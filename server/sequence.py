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

from server.loader import LoadedModel
from server.request import EngineOutput, FinishReason, GenerationRequest, TokenLogprob

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


class Sequence:
    def __init__(
        self,
        request: GenerationRequest,
        memory: LoadedModel | None,
        eos_ids: frozenset[int],
        max_model_len: int,
    ) -> None:
        self.seq_id = next(_ids)
        self.request = request
        self.params = request.params
        self.memory = memory  # None when the base runs alone (no memory or alpha = 0)
        self.memory_name = request.memory if memory is not None else None
        self.alpha = request.alpha if memory is not None else 0.0
        self.memory_temperature = request.memory_temperature if memory is not None else 1.0
        # May the memory draft for the base (when the engine speculates)? Only with a memory at alpha > 0.
        self.speculative = request.speculative and memory is not None
        self.spec_passed = 0.0  # its acceptance tests passed and run, decayed (`server.speculative`)
        self.spec_tests = 0.0
        # Every row draws from a seed, so a row's draws never depend on its batch; unseeded requests get a random one.
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
        """The runner's models this sequence uses: the base (None) and its memory, if any."""
        return (None,) if self.memory_name is None else (None, self.memory_name)

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
        """Keep the first `num_tokens` tokens (at least the prompt); later ones are dropped, and re-sent if re-made."""
        if not self.num_prompt_tokens <= num_tokens <= len(self.token_ids):
            raise ValueError(f"cannot roll back to {num_tokens} tokens: prompt {self.num_prompt_tokens}, have {len(self.token_ids)}")
        del self.token_ids[num_tokens:]
        self._sent_tokens = min(self._sent_tokens, self.num_output_tokens)

    def finish(self, reason: FinishReason, *, stop_reason: str | int | None = None, error: str | None = None) -> None:
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
