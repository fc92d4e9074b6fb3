"""Sliding-window perplexity, the paper's protocol (shared by the server and the toolkit).

Windows of `context_length` tokens advance by `stride`; each window scores only the tokens that no
earlier window scored, so every token after the first is scored exactly once, with as much left
context as the window allows.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
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


DEFAULT_CONTEXT = 1024  # the paper's window
# Per forward: bounds both the pause a server perplexity job imposes on decoding and its memory.
BATCH_TOKENS = 8192
BATCH_LOGITS = 2**27  # 512 MiB of float32 logits


class WindowSettingsError(ValueError):
    """A window length or stride out of range; `param` names the setting."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def window_settings(
    max_len: int, context: int | None = None, stride: int | None = None, *, clamp: bool = False
) -> tuple[int, int]:
    """(context, stride) of the protocol: the window defaults to min(1024, max_len), the stride to half
    the window. A window longer than `max_len` is refused, or cut to it with `clamp` (the toolkit's
    flags, where "as long as the model allows" is the intent)."""
    context = context or min(DEFAULT_CONTEXT, max_len)
    if clamp:
        context = min(context, max_len)
    if not 2 <= context <= max_len:
        raise WindowSettingsError(f"context_length must be in [2, {max_len}] for this model",
                                  "context_length")
    stride = stride or max(context // 2, 1)
    if not 1 <= stride <= context:
        raise WindowSettingsError(f"stride must be in [1, context_length={context}]", "stride")
    return context, stride


def window_batches(
    windows: Iterable[Window],
    max_tokens: int | None = None,
    max_logits: int | None = None,
    vocab_size: int = 1,
    *,
    max_windows: int | None = None,
) -> Iterator[list[Window]]:
    """Consecutive windows of one shape (length, scored count) stacked into batches of at most
    `max_tokens` input tokens, `max_logits` materialised logits (scored positions × vocabulary) and
    `max_windows` windows (None: no such bound).

    Interior windows all share a shape, so a long document runs as a few large forwards instead of
    one small forward per window. Perplexity (server and toolkit) and the datastore batch with this.
    """
    batch: list[Window] = []
    for w in windows:
        shape = (w.end - w.begin, w.num_scored)
        if batch:
            first = batch[0]
            n = len(batch) + 1
            same = shape == (first.end - first.begin, first.num_scored)
            fits = (
                (max_tokens is None or n * shape[0] <= max_tokens)
                and (max_logits is None or n * shape[1] * vocab_size <= max_logits)
                and (max_windows is None or n <= max_windows)
            )
            if not (same and fits):
                yield batch
                batch = []
        batch.append(w)
    if batch:
        yield batch


def _scored_logits(
    model: torch.nn.Module, ids: torch.Tensor, windows: list[Window], vocab_size: int,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits float32 [B, S, V] at the scored positions, divided by `temperature` unless it is 1, their
    targets [B, S]) of one batch of windows."""
    w0 = windows[0]
    length, scored = w0.end - w0.begin, w0.num_scored
    first = w0.score_from - w0.begin - 1  # logits index predicting ids[score_from]
    inp = torch.stack([ids[w.begin : w.end] for w in windows])  # [B, T]
    # Only the scored positions' logits are materialised: [B, S, V] instead of [B, T, V].
    logits = model(input_ids=inp, logits_to_keep=length - first).logits
    targets = torch.stack([ids[w.score_from : w.end] for w in windows])  # [B, S]
    logits = logits[:, :scored, :vocab_size].float()
    return (logits if temperature == 1.0 else logits / temperature), targets


@torch.inference_mode()
def batch_logprobs(
    model: torch.nn.Module, ids: torch.Tensor, windows: list[Window], vocab_size: int,
    temperature: float = 1.0,
) -> torch.Tensor:
    """log p(ids[t] | ids[begin:t]) for t in [score_from, end) of each window: float32 [B, S]; with a
    `temperature`, of softmax(logits / temperature) (a memory's temperature).

    All windows must share (length, num_scored), as `window_batches` groups them. ids: [N] int64 on
    the model's device. Logits are cut to `vocab_size` (= len(tokenizer)) so that padded embedding rows
    never receive probability.
    """
    logits, targets = _scored_logits(model, ids, windows, vocab_size, temperature)
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


@torch.inference_mode()
def batch_distributions(
    model: torch.nn.Module, ids: torch.Tensor, windows: list[Window], vocab_size: int,
    temperature: float = 1.0,
) -> torch.Tensor:
    """The whole next-token log-distribution at the same positions as `batch_logprobs`: float32 [B, S, V]
    (for per-token top alternatives; `batch_logprobs` is its gather at the targets)."""
    return torch.log_softmax(_scored_logits(model, ids, windows, vocab_size, temperature)[0], dim=-1)


def document_logprobs(
    models: Sequence[torch.nn.Module],
    ids: torch.Tensor,
    context: int,
    stride: int,
    vocab_size: int,
    max_tokens: int = BATCH_TOKENS,
    max_logits: int = BATCH_LOGITS,
) -> Iterator[list[torch.Tensor]]:
    """Score one document under several models in the same windows: per batch of windows, one float32
    [B * S] tensor of scored log-probs per model (document order, on that model's device).

    A generator, so a caller can pause between batches (the server interleaves decoding there).
    """
    on_device: dict[torch.device, torch.Tensor] = {}
    devices = [next(m.parameters()).device for m in models]
    for batch in window_batches(sliding_windows(len(ids), context, stride), max_tokens, max_logits,
                                vocab_size):
        out = []
        for model, device in zip(models, devices, strict=True):
            if device not in on_device:
                on_device[device] = ids.to(device)
            out.append(batch_logprobs(model, on_device[device], batch, vocab_size).flatten())
        yield out
