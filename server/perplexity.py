"""Perplexity jobs: both models' target log-probs computed once per window, mixed per alpha.

A job is a generator that yields after each batch of windows, so the engine thread interleaves it
with decode steps instead of stalling every running request for a long document.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from memories.mixing import mix_logprobs
from memories.perplexity import batch_logprobs, sliding_windows, window_batches
from server.errors import InvalidRequestError
from server.loader import LoadedModel
from server.request import DocumentPerplexity, PerplexityRequest, PerplexityResult, PerplexityScore

# Per engine-loop turn: bounds both the pause a perplexity job imposes on decoding and its memory.
MAX_BATCH_TOKENS = 8192
MAX_BATCH_LOGITS = 2**27  # 512 MiB of float32 logits


def resolve_windows(request: PerplexityRequest, max_len: int) -> tuple[int, int]:
    context = request.context_length or min(1024, max_len)
    if not 2 <= context <= max_len:
        raise InvalidRequestError(f"context_length must be in [2, {max_len}] for this model", param="context_length")
    stride = request.stride or max(context // 2, 1)
    if not 1 <= stride <= context:
        raise InvalidRequestError(f"stride must be in [1, context_length={context}]", param="stride")
    return context, stride


def validate(request: PerplexityRequest, vocab: int) -> None:
    if not request.documents:
        raise InvalidRequestError("input must not be empty", param="input")
    for doc in request.documents:
        if len(doc) < 2:
            raise InvalidRequestError("each input needs at least 2 tokens to be scored", param="input")
        bad = next((t for t in doc if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError(f"token id {bad} is out of vocabulary (valid ids: 0..{vocab - 1})", param="input")
    for a in request.alphas:
        if not 0.0 <= a <= 1.0:
            raise InvalidRequestError(f"alpha must be in [0, 1], got {a}", param="alpha")


def run_perplexity(
    request: PerplexityRequest,
    base: LoadedModel,
    memory: LoadedModel | None,
    context: int,
    stride: int,
) -> Iterator[PerplexityResult | None]:
    """Yields None after each window and the result last."""
    docs: list[DocumentPerplexity] = []
    alphas = torch.tensor(request.alphas, dtype=torch.float32, device=base.device)  # [A]
    for doc in request.documents:
        ids = torch.tensor(doc, device=base.device)  # [N]
        base_nll = 0.0
        mem_nll = 0.0
        mixed_nll = torch.zeros(len(request.alphas), dtype=torch.float64, device=base.device)  # [A]
        count = 0
        windows = sliding_windows(len(doc), context, stride)
        for batch in window_batches(windows, MAX_BATCH_TOKENS, MAX_BATCH_LOGITS, base.vocab_size):
            base_lp = batch_logprobs(base.model, ids, batch, base.vocab_size).flatten()  # [B * S]
            base_nll -= base_lp.double().sum().item()
            if memory is not None:
                mem_lp = batch_logprobs(memory.model, ids, batch, base.vocab_size).flatten()  # [B * S]
                mem_nll -= mem_lp.double().sum().item()
                mixed = mix_logprobs(base_lp.unsqueeze(0), mem_lp.unsqueeze(0), alphas)  # [A, B * S]
                mixed_nll -= mixed.double().sum(dim=-1)
            count += base_lp.numel()
            yield None
        docs.append(
            DocumentPerplexity(
                base=PerplexityScore(base_nll, count),
                mixed=tuple(PerplexityScore(v, count) for v in mixed_nll.tolist()) if memory is not None else (),
                memory_alone=PerplexityScore(mem_nll, count) if memory is not None else None,
            )
        )
    yield PerplexityResult(request.request_id, tuple(docs), context, stride)
