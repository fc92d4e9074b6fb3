"""The synchronous engine: one `step()` = schedule → run both models → mix/sample → update.

It owns no thread; `AsyncEngine` drives it from one. Tests drive it directly, step by step.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Protocol

import torch

from memories.mixing import mix_logprobs
from server.config import EngineConfig
from server.errors import InvalidRequestError
from server.loader import LoadedModel
from server.registry import MemoryRegistry
from server.request import FinishReason, GenerationRequest, RequestOutput, TokenLogprob
from server.runner import ModelRunner, StepLogits
from server.sampler import make_generator, sample, top_logprobs
from server.scheduler import Scheduler
from server.sequence import Sequence

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepStats:
    is_prefill: bool
    batch_size: int
    num_tokens: int  # tokens processed by the base this step
    phases: dict[str, float]  # schedule, base_forward, memory_forward, mix_sample (seconds)


class EngineObserver(Protocol):
    def on_step(self, stats: StepStats) -> None: ...
    def on_queue(self, running: int, waiting: int) -> None: ...
    def on_request_finished(self, seq: Sequence) -> None: ...


class Engine:
    def __init__(
        self,
        base: LoadedModel,
        registry: MemoryRegistry,
        config: EngineConfig | None = None,
        observer: EngineObserver | None = None,
    ) -> None:
        self.base = base
        self.registry = registry
        self.config = config or EngineConfig()
        self.observer = observer
        self.max_model_len = min(base.max_model_len, self.config.max_model_len or base.max_model_len)
        self.scheduler = Scheduler(self.config.max_num_seqs, self.config.max_num_batched_tokens)
        self.runner = ModelRunner(base, use_streams=self.config.use_cuda_streams)

    # -- admission -------------------------------------------------------------------------------
    def validate(self, request: GenerationRequest) -> None:
        """Raise the client's mistake as a 4xx error; nothing is queued or acquired."""
        ids = request.prompt_token_ids
        if not ids:
            raise InvalidRequestError("the prompt must contain at least one token", param="prompt")
        vocab = self.base.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError(f"token id {bad} is out of vocabulary (valid ids: 0..{vocab - 1})", param="prompt")
        if not 0.0 <= request.alpha <= 1.0:
            raise InvalidRequestError(f"alpha must be in [0, 1], got {request.alpha}", param="alpha")
        max_len = self.max_model_len
        if request.memory is not None:
            max_len = min(max_len, self.registry.get(request.memory).max_model_len)
        total = len(ids) + request.params.max_tokens
        if total > max_len:
            raise InvalidRequestError(
                f"This model's maximum context length is {max_len} tokens. However, you requested "
                f"{total} tokens ({len(ids)} in the messages, {request.params.max_tokens} in the completion). "
                "Please reduce the length of the messages or completion.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        for name, n in (("logprobs", request.params.logprobs), ("prompt_logprobs", request.params.prompt_logprobs)):
            if n is not None and not 0 <= n <= vocab:
                raise InvalidRequestError(f"{name} must be in [0, {vocab}]", param="logprobs")
        bad_stop = next((t for t in request.params.stop_token_ids if not 0 <= t < vocab), None)
        if bad_stop is not None:
            raise InvalidRequestError(f"stop token id {bad_stop} is out of vocabulary", param="stop_token_ids")

    def add_request(self, request: GenerationRequest) -> Sequence:
        self.validate(request)
        memory = None
        if request.memory is not None and request.alpha > 0.0:
            memory = self.registry.acquire(request.memory)  # NotFoundError when unknown or retiring
        seq = Sequence(
            request,
            memory,
            self.base.tokenizer,
            self.base.eos_token_ids,
            self.max_model_len if memory is None else min(self.max_model_len, memory.max_model_len),
            make_generator(request.params.seed, self.base.device),
        )
        self.scheduler.add(seq)
        return seq

    def abort_request(self, request_id: str) -> RequestOutput | None:
        seq = self.scheduler.find(request_id)
        if seq is None:
            return None
        seq.finish(FinishReason.ABORT)
        return self._retire([seq])[0]

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # -- the step ----------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        t0 = time.perf_counter()
        batch = self.scheduler.schedule()
        seqs = batch.seqs
        if not seqs:
            return []
        now = time.monotonic()
        for seq in seqs:
            if seq.timings.scheduled is None:
                seq.timings.scheduled = now
        t_sched = time.perf_counter() - t0
        try:
            logits = self.runner.run(seqs, batch.is_prefill)
        except Exception as exc:  # the base failed: every sequence of this step fails, the engine lives on
            log.exception("base forward failed")
            return self._fail_step(seqs, batch.is_prefill, f"base forward failed: {type(exc).__name__}: {exc}")
        t1 = time.perf_counter()
        tokens, logprobs, prompt_lps = self._mix_and_sample(seqs, logits)  # ends with the host sync
        now = time.monotonic()
        for i, seq in enumerate(seqs):
            if i in logits.failed:
                seq.finish(FinishReason.ERROR, error=logits.failed[i])
                continue
            if i in prompt_lps:
                seq.prompt_logprobs = prompt_lps[i]
            if batch.is_prefill and seq.params.max_tokens == 0:
                seq.finish(FinishReason.LENGTH)  # prompt scoring only (echo)
                continue
            seq.append(tokens[i], logprobs.get(i), now)
        outputs = self._collect(seqs)
        if self.observer is not None:
            phases = {"schedule": t_sched, **logits.forward_seconds(), "mix_sample": time.perf_counter() - t1}
            num_tokens = sum(len(s.token_ids) for s in seqs) if batch.is_prefill else len(seqs)
            self.observer.on_step(StepStats(batch.is_prefill, len(seqs), num_tokens, phases))
        return outputs

    def _mix_and_sample(self, seqs: list[Sequence], logits: StepLogits):
        logp = torch.log_softmax(logits.base.float(), dim=-1)  # [B, V]
        base_prompt = logits.prompt
        mixed_prompt: dict[int, torch.Tensor] = {}
        for group in logits.memories:
            rows = torch.tensor(group.rows, device=logp.device)
            alpha = torch.tensor([seqs[i].alpha for i in group.rows], device=logp.device)  # [b]
            mem_lp = torch.log_softmax(group.logits.float(), dim=-1)  # [b, V]
            logp[rows] = mix_logprobs(logp[rows], mem_lp, alpha)
            for i, mem_prompt in group.prompt.items():
                mixed_prompt[i] = mix_logprobs(
                    torch.log_softmax(base_prompt[i].float(), -1), torch.log_softmax(mem_prompt.float(), -1), seqs[i].alpha
                )  # [T, V]
        tokens_t = sample(logp, [s.params for s in seqs], [s.generator for s in seqs])  # [B]
        tokens = tokens_t.tolist()  # the step's one host sync
        logprobs: dict[int, TokenLogprob] = {}
        want = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        if want:
            n = max(seqs[i].params.logprobs or 0 for i in want)
            top_v, top_i = top_logprobs(logp[want], n)  # [W, n]
            chosen = logp[want].gather(-1, tokens_t[want].unsqueeze(-1)).squeeze(-1).tolist()  # [W]
            top_v, top_i = top_v.tolist(), top_i.tolist()
            for j, i in enumerate(want):
                k = seqs[i].params.logprobs or 0
                logprobs[i] = TokenLogprob(tokens[i], chosen[j], tuple(zip(top_i[j][:k], top_v[j][:k], strict=True)))
        prompt_lps = {}
        for i, base_prompt_logits in base_prompt.items():
            lp = mixed_prompt.get(i)
            if lp is None:
                lp = torch.log_softmax(base_prompt_logits.float(), dim=-1)  # [T, V]
            prompt_lps[i] = _prompt_logprobs(lp, seqs[i].token_ids[: seqs[i].num_prompt_tokens], seqs[i].params.prompt_logprobs or 0)
        return tokens, logprobs, prompt_lps

    def _fail_step(self, seqs: list[Sequence], is_prefill: bool, message: str) -> list[RequestOutput]:
        victims = seqs if is_prefill else list(self.scheduler.running)
        if not is_prefill:
            self.runner.reset()  # the base cache may be half-appended
        for seq in victims:
            seq.finish(FinishReason.ERROR, error=message)
        return self._retire(victims)

    def _collect(self, seqs: list[Sequence]) -> list[RequestOutput]:
        outputs = [o for s in seqs if not s.is_finished and (o := s.take_output()) is not None]
        finished = [s for s in seqs if s.is_finished]
        return outputs + self._retire(finished)

    def _retire(self, seqs: list[Sequence]) -> list[RequestOutput]:
        """Free caches and memories of finished sequences; return their final outputs."""
        if not seqs:
            return []
        self.scheduler.remove(seqs)
        self.runner.free(seqs)
        outputs = []
        for seq in seqs:
            if seq.memory is not None:
                seq.memory = None
                self.registry.release(seq.request.memory)  # type: ignore[arg-type]
            out = seq.take_output()
            if out is not None:
                outputs.append(out)
            if self.observer is not None:
                self.observer.on_request_finished(seq)
        return outputs

    def fail_all(self, message: str) -> list[RequestOutput]:
        seqs = [*self.scheduler.running, *self.scheduler.waiting]
        for seq in seqs:
            seq.finish(FinishReason.ERROR, error=message)
        self.runner.reset()
        return self._retire(seqs)


def _prompt_logprobs(lp: torch.Tensor, prompt: list[int], n: int) -> tuple[TokenLogprob | None, ...]:
    """Per prompt token: its log-prob given the tokens before it (None for the first), plus top-n."""
    targets = torch.tensor(prompt[1:], device=lp.device)  # [T-1]
    chosen = lp[:-1].gather(-1, targets.unsqueeze(-1)).squeeze(-1).tolist()  # [T-1]
    top_v, top_i = top_logprobs(lp[:-1], n)
    top_v, top_i = top_v.tolist(), top_i.tolist()
    out: list[TokenLogprob | None] = [None]
    for t in range(len(prompt) - 1):
        out.append(TokenLogprob(prompt[t + 1], chosen[t], tuple(zip(top_i[t], top_v[t], strict=True))))
    return tuple(out)
