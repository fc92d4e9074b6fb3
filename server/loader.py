"""What the server holds of a loaded model (base or memory): `memories.models` loads it, this adds what
serving needs to know about it (vocabulary, context, EOS ids, size)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from memories.models import (
    ModelLoadError,
    check_vocab,
    context_length,
    eos_token_ids,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
)
from memories.models import load_causal_lm as _load_model
from server.config import ModelConfig

__all__ = ["LoadedModel", "ModelLoadError", "load_base", "load_causal_lm", "load_tokenizer"]

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name_or_path: str  # what the user gave: goes into model cards' `root`
    vocab_size: int  # len(tokenizer): logits beyond it are embedding padding and never get probability
    max_model_len: int
    num_parameters: int
    device: torch.device
    dtype: torch.dtype
    eos_token_ids: frozenset[int]


def load_causal_lm(
    path: str,
    device: torch.device,
    dtype: torch.dtype,
    tokenizer: PreTrainedTokenizerBase,
    max_model_len: int | None = None,
) -> LoadedModel:
    """Load for serving with `tokenizer` (the base's): its output layer must cover the vocabulary."""
    model = _load_model(path, device, dtype)
    model.requires_grad_(False)
    vocab = len(tokenizer)
    check_vocab(model, vocab, path)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name_or_path=path,
        vocab_size=vocab,
        max_model_len=context_length(model, max_model_len),
        num_parameters=sum(p.numel() for p in model.parameters()),
        device=device,
        dtype=dtype,
        eos_token_ids=eos_token_ids(model, tokenizer),
    )


def load_base(cfg: ModelConfig, max_model_len: int | None = None) -> LoadedModel:
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    loaded = load_causal_lm(cfg.model, device, dtype, load_tokenizer(cfg.model), max_model_len)
    log.info(
        "base %s: %.1fM params, vocab %d, context %d, %s on %s",
        cfg.model, loaded.num_parameters / 1e6, loaded.vocab_size, loaded.max_model_len, dtype, device,
    )  # fmt: skip
    return loaded
