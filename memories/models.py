"""The one model loader, for the server and the toolkit: devices, dtypes, tokenizers, causal LMs (local
directories or cached hub ids) and their context length.

Weights load from safetensors only and no repository code ever runs (`trust_remote_code=False`). Every
failure to load is a ModelLoadError with the path in its message, so the toolkit's CLI prints one line
and the server answers a 4xx (or stops at start-up) instead of leaking a transformers exception.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from memories.config import DTYPE_CHOICES

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Where configs keep the position-table size, by architecture family (GPT-2 calls it n_positions).
_CONTEXT_ATTRS = ("max_position_embeddings", "n_positions", "max_seq_len", "max_sequence_length", "seq_length")


class ModelLoadError(ValueError):
    """The model or tokenizer cannot be loaded, or is unusable."""


def resolve_device(device: str = "auto") -> torch.device:
    """`auto`: CUDA when available."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ModelLoadError(f"unknown device {device!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but CUDA is not available")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto`: bfloat16 on GPU when supported (else float16), float32 on CPU (half matmuls are slow there)."""
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose {', '.join(DTYPE_CHOICES)}")
    return DTYPES[dtype]


def context_length(model_or_config: Any, cap: int | None = None) -> int:
    """The longest sequence the model accepts (its position table), at most `cap`.

    A config that does not say is an error unless `cap` gives the length: guessing would let a request
    run past the position table (an index error deep in the model, or silent garbage).
    """
    config = getattr(model_or_config, "config", model_or_config)
    for attr in _CONTEXT_ATTRS:
        value = getattr(config, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return min(value, cap) if cap else value
    if cap:
        return cap
    raise ModelLoadError(
        f"cannot tell the model's context length (none of {', '.join(_CONTEXT_ATTRS)} in its config); "
        "give it explicitly (--max-model-len when serving, --context / --seq-len in the toolkit)"
    )


def _check_path(path: str) -> None:
    """A path that looks local must be a directory; an OS-unusable one (NUL, name too long) is our error."""
    try:
        local = path.startswith(("/", "./", "../", "~")) or Path(path).exists()
        if local and not Path(path).expanduser().is_dir():
            raise ModelLoadError(f"model directory {path!r} does not exist")
    except (OSError, ValueError) as exc:
        if isinstance(exc, ModelLoadError):
            raise
        raise ModelLoadError(f"model path {path[:200]!r} cannot be used: {exc}") from None


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    path = str(path)
    _check_path(path)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception as exc:  # transformers raises many types for a bad directory
        raise ModelLoadError(f"cannot load a tokenizer from {path!r}: {exc}") from exc


def load_causal_lm(
    path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> PreTrainedModel:
    """A causal LM from safetensors weights, on `device`, in eval mode."""
    path = str(path)
    _check_path(path)
    local = Path(path)
    if local.is_dir() and not any(local.glob("*.safetensors")):
        raise ModelLoadError(f"{path} has no *.safetensors weights; only safetensors are loaded (no pickle)")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True, trust_remote_code=False)
    except Exception as exc:
        raise ModelLoadError(f"cannot load a causal LM from {path!r}: {exc}") from exc
    move(model, device)
    return model.eval()


def move(model: torch.nn.Module, device: torch.device | str) -> None:
    """`model.to(device)`, in place. Called through nn.Module because transformers wraps `to` in a
    decorator whose signature type checkers misread."""
    torch.nn.Module.to(model, device)


def embedding_rows(module: torch.nn.Module) -> int:
    """Rows of an embedding or output layer: how many token ids it can take or score."""
    weight: Any = getattr(module, "weight")  # noqa: B009 - a Module's attributes are typed as Tensor | Module
    return int(weight.shape[0])


def check_vocab(model: PreTrainedModel, vocab_size: int, path: str | Path) -> None:
    """The output layer must score every token of the tokenizer (padding rows beyond it are fine)."""
    rows = embedding_rows(model.get_output_embeddings())
    if rows < vocab_size:
        raise ModelLoadError(
            f"{path}: the output layer has {rows} rows but the tokenizer has {vocab_size} tokens; "
            "the model cannot score every token"
        )


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """Every id the model's generation config, model config or tokenizer calls end-of-sequence."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


def model_id(path: str | Path) -> str:
    """How a model is named in manifests: the resolved directory when local, else the hub id as given."""
    p = Path(path)
    return str(p.resolve()) if p.exists() else str(path)
