"""Perplexity jobs: both models' target log-probs computed once per window, mixed per alpha.

A job is scheduled like any other work (`Scheduler.jobs`): each SCORE step runs one batch of windows
(at most `BATCH_TOKENS` tokens, which bounds the pause it imposes on decoding) through the model runner (base and memory overlapped on two streams, a failing memory fails the job
only) and accumulates on the device; the host reads the sums once, when the job is done.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from memories.mixing import mix_logprobs
from memories.perplexity import BATCH_LOGITS, BATCH_TOKENS, Window, sliding_windows, window_batches
from server.loader import LoadedModel
from server.request import DocumentPerplexity, PerplexityRequest, PerplexityResult, PerplexityScore
from server.transfer import fetch


class PerplexityJob:
    """One request's windows, in batches, and its running sums (on the device)."""

    def __init__(self, request: PerplexityRequest, base: LoadedModel, memory: LoadedModel | None, context: int, stride: int) -> None:
        self.request = request
        self.memory = memory
        self.memory_name = request.memory if memory is not None else None
        self.context, self.stride = context, stride
        self.device = base.device
        self._alphas = torch.tensor(request.alphas, dtype=torch.float32).to(self.device)  # [A]
        zeros = torch.zeros(len(request.documents), dtype=torch.float64)
        self._base_nll = zeros.clone().to(self.device)  # [D]
        self._mem_nll = zeros.clone().to(self.device)  # [D]
        self._mixed_nll = torch.zeros(len(request.documents), len(request.alphas), dtype=torch.float64).to(self.device)  # [D, A]
        self._counts = [0] * len(request.documents)
        self._batches = self._all_batches(base.vocab_size)
        self.current: tuple[int, torch.Tensor, list[Window]] | None = next(self._batches, None)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def done(self) -> bool:
        return self.current is None

    def _all_batches(self, vocab: int) -> Iterator[tuple[int, torch.Tensor, list[Window]]]:
        for d, doc in enumerate(self.request.documents):
            ids = torch.tensor(doc).to(self.device)  # [N]
            windows = sliding_windows(len(doc), self.context, self.stride)
            for batch in window_batches(windows, BATCH_TOKENS, BATCH_LOGITS, vocab):
                yield d, ids, batch

    def add(self, base_lp: torch.Tensor, mem_lp: torch.Tensor | None) -> None:
        """Account the current batch's target log-probs ([B, S] each) and move to the next batch."""
        assert self.current is not None
        d = self.current[0]
        self._base_nll[d] -= base_lp.double().sum()
        if mem_lp is not None:
            self._mem_nll[d] -= mem_lp.double().sum()
            mixed = mix_logprobs(base_lp.flatten().unsqueeze(0), mem_lp.flatten().unsqueeze(0), self._alphas)  # [A, B*S]
            self._mixed_nll[d] -= mixed.double().sum(dim=-1)
        self._counts[d] += base_lp.numel()
        self.current = next(self._batches, None)

    def result(self) -> PerplexityResult:
        base, mem, mixed = (a.tolist() for a in fetch(self._base_nll, self._mem_nll, self._mixed_nll))
        docs = []
        for d, count in enumerate(self._counts):
            with_memory = self.memory is not None
            docs.append(
                DocumentPerplexity(
                    base=PerplexityScore(base[d], count),
                    mixed=tuple(PerplexityScore(v, count) for v in mixed[d]) if with_memory else (),
                    memory_alone=PerplexityScore(mem[d], count) if with_memory else None,
                )
            )
        return PerplexityResult(self.request_id, tuple(docs), self.context, self.stride)
