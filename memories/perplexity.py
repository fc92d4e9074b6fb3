"""Sliding-window perplexity, the paper's protocol (shared by the server and the toolkit).

Windows of `context_length` tokens advance by `stride`; each window scores only the tokens that no
earlier window scored, so every token after the first is scored exactly once, with as much left
context as the window allows.
"""

from __future__ import annotations

from collections.abc import Iterator
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


@torch.inference_mode()
def window_logprobs(
    model: torch.nn.Module, ids: torch.Tensor, window: Window, vocab_size: int
) -> torch.Tensor:
    """log p(ids[t] | ids[begin:t]) for t in [score_from, end): float32 [num_scored].

    ids: [N] int64 on the model's device. Logits are cut to `vocab_size` (= len(tokenizer)) so that
    padded embedding rows never receive probability.
    """
    inp = ids[window.begin : window.end].unsqueeze(0)  # [1, T]
    first = window.score_from - window.begin - 1  # logits index predicting ids[score_from]
    # Only the scored positions' logits are materialised: [1, num_scored, V] instead of [1, T, V].
    logits = model(input_ids=inp, logits_to_keep=window.end - window.begin - first).logits
    logits = logits[0, : window.num_scored, :vocab_size].float()  # [S, V]
    targets = ids[window.score_from : window.end]  # [S]
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
