"""Load a Hugging Face causal LM (base or memory) safely: safetensors only, never remote code."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from memories.models import resolve_device, resolve_dtype
from server.config import ModelConfig

log = logging.getLogger(__name__)


class ModelLoadError(ValueError):
    """The model or tokenizer cannot be loaded, or is unusable for serving."""


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


def _device(device: str) -> torch.device:
    try:
        return resolve_device(device)
    except (ValueError, RuntimeError) as exc:
        raise ModelLoadError(str(exc)) from exc


def _context_length(config, cap: int | None) -> int:
    for attr in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return min(value, cap) if cap else value
    if cap:
        return cap
    raise ModelLoadError("cannot tell the model's context length; pass --max-model-len")


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


def _check_exists(path: str) -> None:
    try:
        local = path.startswith(("/", "./", "../", "~")) or Path(path).exists()
        if local and not Path(path).expanduser().is_dir():
            raise ModelLoadError(f"model directory {path!r} does not exist")
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"model path {path[:200]!r} cannot be used: {exc}") from exc


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    _check_exists(path)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception as exc:  # transformers raises many types for a bad directory
        raise ModelLoadError(f"cannot load a tokenizer from {path!r}: {exc}") from exc


def load_causal_lm(
    path: str,
    device: torch.device,
    dtype: torch.dtype,
    tokenizer: PreTrainedTokenizerBase,
    max_model_len: int | None = None,
) -> LoadedModel:
    _check_exists(path)
    local = Path(path)
    if local.is_dir() and not any(local.glob("*.safetensors")):
        raise ModelLoadError(f"{path} has no *.safetensors weights; only safetensors are loaded (no pickle)")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, use_safetensors=True, trust_remote_code=False
        )
    except Exception as exc:
        raise ModelLoadError(f"cannot load a causal LM from {path!r}: {exc}") from exc
    model = model.to(device).eval()
    model.requires_grad_(False)
    vocab = len(tokenizer)
    rows = model.get_output_embeddings().weight.shape[0]
    if rows < vocab:
        raise ModelLoadError(
            f"{path}: the output layer has {rows} rows but the tokenizer has {vocab} tokens; "
            "the model cannot score every token"
        )
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name_or_path=path,
        vocab_size=vocab,
        max_model_len=_context_length(model.config, max_model_len),
        num_parameters=sum(p.numel() for p in model.parameters()),
        device=device,
        dtype=dtype,
        eos_token_ids=_eos_ids(model, tokenizer),
    )


def load_base(cfg: ModelConfig, max_model_len: int | None = None) -> LoadedModel:
    device = _device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    tokenizer = load_tokenizer(cfg.model)
    loaded = load_causal_lm(cfg.model, device, dtype, tokenizer, max_model_len)
    log.info(
        "base %s: %.1fM params, vocab %d, context %d, %s on %s",
        cfg.model, loaded.num_parameters / 1e6, loaded.vocab_size, loaded.max_model_len, dtype, device,
    )
    return loaded
