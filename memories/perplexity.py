"""Sliding-window perplexity, the paper's protocol (shared by the server and the toolkit).

Windows of `context_length` tokens advance by `stride`; each window scores only the tokens that no
earlier window scored, so every token after the first is scored exactly once, with as much left
context as the window allows.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Window:
    begin: int  # the model sees ids[begin:end]
    end: int
    score_from: int  # absolute position of the first token scored in this window (>= begin + 1)

    @property
    def num_scored(self) -> int:
        return self.end - self.score_from


def sliding_windows(num_tokens: int, context_length: int, stride: int) -> Iterator[Window]:
    if context_length < 2:
        raise ValueError("context_length must be at least 2")
    if not 1 <= stride <= context_length:
        raise ValueError("stride must be in [1, context_length]")
    prev_end = 0
    for begin in range(0, max(num_tokens - 1, 1), stride):
        end = min(begin + context_length, num_tokens)
        score_from = max(prev_end, begin + 1)
        if end > score_from:
            yield Window(begin, end, score_from)
        prev_end = end
        if end == num_tokens:
            break


def default_context(max_model_len: int, requested: int | None = None) -> int:
    return min(requested or 1024, max_model_len)


def window_batches(windows: Iterable[Window], max_tokens: int, max_logits: int, vocab_size: int) -> Iterator[list[Window]]:
    """Consecutive windows of one shape (length, scored count) stacked into batches of at most
    `max_tokens` input tokens and `max_logits` materialised logits (scored positions × vocabulary).

    Interior windows all share a shape, so a long document runs as a few large forwards instead of
    one small forward per window.
    """
    batch: list[Window] = []
    for w in windows:
        shape = (w.end - w.begin, w.num_scored)
        if batch:
            first = batch[0]
            same = shape == (first.end - first.begin, first.num_scored)
            fits = (len(batch) + 1) * shape[0] <= max_tokens and (len(batch) + 1) * shape[1] * vocab_size <= max_logits
            if not (same and fits):
                yield batch
                batch = []
        batch.append(w)
    if batch:
        yield batch


@torch.inference_mode()
def batch_logprobs(model: torch.nn.Module, ids: torch.Tensor, windows: list[Window], vocab_size: int) -> torch.Tensor:
    """log p(ids[t] | ids[begin:t]) for t in [score_from, end) of each window: float32 [B, S].

    All windows must share (length, num_scored), as `window_batches` groups them. ids: [N] int64 on
    the model's device. Logits are cut to `vocab_size` (= len(tokenizer)) so that padded embedding rows
    never receive probability.
    """
    w0 = windows[0]
    length, scored = w0.end - w0.begin, w0.num_scored
    first = w0.score_from - w0.begin - 1  # logits index predicting ids[score_from]
    inp = torch.stack([ids[w.begin : w.end] for w in windows])  # [B, T]
    # Only the scored positions' logits are materialised: [B, S, V] instead of [B, T, V].
    logits = model(input_ids=inp, logits_to_keep=length - first).logits
    logits = logits[:, :scored, :vocab_size].float()  # [B, S, V]
    targets = torch.stack([ids[w.score_from : w.end] for w in windows])  # [B, S]
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def window_logprobs(model: torch.nn.Module, ids: torch.Tensor, window: Window, vocab_size: int) -> torch.Tensor:
    """One window's scored log-probs: float32 [num_scored]."""
    return batch_logprobs(model, ids, [window], vocab_size)[0]
