"""A request's life inside the engine: its tokens, text, stop checks and timings."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from server.loader import LoadedModel
from server.request import FinishReason, GenerationRequest, RequestOutput, TokenLogprob

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


class IncrementalDetokenizer:
    """Text deltas from token ids, robust to tokens that end inside a UTF-8 character.

    Decodes a short window (a few tokens of left context, so leading-space rules of the tokenizer
    apply) instead of the whole output each step.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt: list[int]) -> None:
        self.tokenizer = tokenizer
        self.prefix_offset = max(len(prompt) - 5, 0)
        self.read_offset = len(prompt)

    def step(self, all_ids: list[int]) -> str:
        # Special tokens (EOS) end a completion; like vLLM's default, they are not part of its text.
        prefix = self.tokenizer.decode(all_ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        full = self.tokenizer.decode(all_ids[self.prefix_offset :], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(all_ids)
            return full[len(prefix) :]
        return ""


class Sequence:
    def __init__(
        self,
        request: GenerationRequest,
        memory: LoadedModel | None,
        tokenizer: PreTrainedTokenizerBase,
        eos_ids: frozenset[int],
        max_model_len: int,
        generator: torch.Generator | None,
    ) -> None:
        self.seq_id = next(_ids)
        self.request = request
        self.params = request.params
        self.memory = memory  # None when the base runs alone (no memory or alpha = 0)
        self.alpha = request.alpha if memory is not None else 0.0
        self.token_ids: list[int] = list(request.prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.status = Status.WAITING
        self.generator = generator
        self.timings = Timings()
        self.max_len = min(max_model_len, self.num_prompt_tokens + self.params.max_tokens)
        self._stop_ids = set(self.params.stop_token_ids) | (set() if self.params.ignore_eos else set(eos_ids))
        self._detok = IncrementalDetokenizer(tokenizer, self.token_ids)
        self._hold = max((len(s) for s in self.params.stop), default=1) - 1  # chars withheld while a stop string may be forming
        self.text = ""
        self._sent_text = 0
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
    def memory_name(self) -> str | None:
        return self.request.memory if self.memory is not None else None

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]

    def append(self, token: int, logprob: TokenLogprob | None, now: float) -> None:
        """Add a sampled token, then decide whether the sequence is done."""
        timings = self.timings
        if timings.first_token is None:
            timings.first_token = now
        else:
            timings.inter_token.append(now - (timings.last_token or now))
        timings.last_token = now
        self.token_ids.append(token)
        if logprob is not None:
            self._pending_logprobs.append(logprob)
        checked = len(self.text)
        self.text += self._detok.step(self.token_ids)
        if token in self._stop_ids:
            self.finish(FinishReason.STOP, stop_reason=token if token in self.params.stop_token_ids else None)
        elif self._check_stop_strings(checked):
            pass
        elif len(self.token_ids) >= self.max_len:
            self.finish(FinishReason.LENGTH)

    def _check_stop_strings(self, checked: int) -> bool:
        if not self.params.stop or len(self.text) == checked:
            return False
        # A new match must end inside the new delta, so it starts at most `_hold` chars before it.
        start = max(0, checked - self._hold)
        best: tuple[int, str] | None = None
        for stop in self.params.stop:
            idx = self.text.find(stop, start)
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, stop)
        if best is None:
            return False
        self.text = self.text[: best[0]]
        self.finish(FinishReason.STOP, stop_reason=best[1])
        return True

    def finish(self, reason: FinishReason, *, stop_reason: str | int | None = None, error: str | None = None) -> None:
        if self.status is Status.FINISHED:
            return
        self.status = Status.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason
        self.error = error
        self.timings.finished = time.monotonic()

    def take_output(self) -> RequestOutput | None:
        """The delta since the last call, or None when there is nothing new to say."""
        finished = self.is_finished
        visible = len(self.text) if finished else max(self._sent_text, len(self.text) - self._hold)
        new_text = self.text[self._sent_text : visible]
        new_tokens = tuple(self.token_ids[self.num_prompt_tokens + self._sent_tokens :])
        prompt_lp = None
        if self.prompt_logprobs is not None and not self._prompt_logprobs_sent:
            prompt_lp, self._prompt_logprobs_sent = self.prompt_logprobs, True
        if not (new_text or new_tokens or finished or prompt_lp is not None):
            return None
        logprobs = tuple(self._pending_logprobs) if self.params.logprobs is not None else None
        self._pending_logprobs = []
        self._sent_text = visible
        self._sent_tokens += len(new_tokens)
        return RequestOutput(
            request_id=self.request_id,
            new_token_ids=new_tokens,
            new_text=new_text,
            new_logprobs=logprobs,
            prompt_logprobs=prompt_lp,
            finished=finished,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
            error=self.error,
            num_prompt_tokens=self.num_prompt_tokens,
            num_output_tokens=self.num_output_tokens,
        )
