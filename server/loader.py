"""What the server holds of a loaded model (base or memory): `memories.models` loads it, this adds what
serving needs to know about it (vocabulary, context, EOS ids, size)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from memories.gguf import inspect as inspect_gguf
from memories.models import (
    ModelLoadError,
    check_vocab,
    context_length,
    eos_token_ids,
    has_safetensors,
    is_gguf_path,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
    resolve_source,
)
from memories.models import load_causal_lm as _load_model
from memories.quantize import QuantizationError, auto_scheme, check_scheme, quantize_model
from server.config import ModelConfig

if TYPE_CHECKING:
    from server.tp import ShardedBase

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
    weights_format: str = "safetensors"  # or "gguf" (then dequantized to `dtype` at load)
    quantization: str | None = None  # a GGUF file's type (Q4_1, Q8_0, F16 …): what the weights were stored as
    # What the linear layers run in when serving (memories.quantize): "int8", "int4", or None (`dtype`).
    serving_quantization: str | None = None
    # Rank 0's handle on the other tensor-parallel ranks when the base is sharded (`server/tp.py`); None
    # otherwise.
    tensor_parallel: ShardedBase | None = None


def load_causal_lm(
    path: str,
    device: torch.device,
    dtype: torch.dtype,
    tokenizer: PreTrainedTokenizerBase,
    max_model_len: int | None = None,
    sharded: bool = False,
    quantization: str = "none",
) -> LoadedModel:
    """Load for serving with `tokenizer` (the base's): its output layer must cover the vocabulary.
    `sharded`: this process's tensor-parallel share (torch.distributed is initialised; `load_sharded`).
    `quantization`: a scheme of `memories.quantize` ("auto" resolves from the file and the device)."""
    gguf = inspect_gguf(path) if is_gguf_path(path) else None
    scheme = (auto_scheme(device, gguf.quantization if gguf else None) if quantization == "auto"
              else quantization)
    try:
        check_scheme(scheme, device)
    except QuantizationError as exc:
        raise ModelLoadError(f"{path}: {exc}") from exc
    if sharded and scheme != "none":
        raise ModelLoadError(f"{path}: --quantization {scheme} runs on one CPU; tensor parallelism shards "
                             "float weights")
    model = load_sharded(path, dtype) if sharded else _load_model(path, device, dtype)
    model.requires_grad_(False)
    vocab = len(tokenizer)
    check_vocab(model, vocab, path)
    num_parameters = sum(p.numel() for p in model.parameters())  # counted before packing changes the tensors
    if scheme != "none":
        summary = quantize_model(model, scheme)
        log.info("%s: %s", path, summary.describe())
        # no layer either kernel takes (a memory of odd widths): it serves as loaded
        if not summary.quantized:
            scheme = "none"
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name_or_path=path,
        vocab_size=vocab,
        max_model_len=context_length(model, max_model_len),
        num_parameters=num_parameters,
        device=device,
        dtype=dtype,
        eos_token_ids=eos_token_ids(model, tokenizer),
        weights_format="gguf" if gguf else "safetensors",
        quantization=gguf.quantization if gguf else None,
        serving_quantization=None if scheme == "none" else scheme,
    )


def load_sharded(path: str, dtype: torch.dtype) -> PreTrainedModel:
    """This rank's share of a causal LM under transformers' own tensor-parallel plan (`tp_plan="auto"`): q/k/v
    and gate/up column-parallel (whole heads per rank), o and down row-parallel with an all-reduce, lm_head
    column-parallel with its logits gathered on every rank; each rank reads only its slices of the weights."""
    if is_gguf_path(path):
        raise ModelLoadError(f"{path}: tensor parallelism loads safetensors shards; a GGUF base serves on "
                             "one device")
    local = resolve_source(path)
    if not has_safetensors(local):  # the same refusal as unsharded loads give (pickles are never opened)
        return _load_model(path, torch.device("meta"), dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(local), dtype=dtype, use_safetensors=True,
                                                     tp_plan="auto")
    except Exception as exc:
        raise ModelLoadError(f"cannot load {path!r} sharded for tensor parallelism: {exc}") from exc
    if not getattr(model, "_tp_plan", None):
        raise ModelLoadError(f"{path!r} ({type(model).__name__}) has no tensor-parallel plan in transformers")
    model.requires_grad_(False)
    return model.eval()


def load_base(cfg: ModelConfig, max_model_len: int | None = None, sharded: bool = False) -> LoadedModel:
    """`sharded`: this rank's share under tensor parallelism, on the device torch.distributed bound it to."""
    device = resolve_device(cfg.device)
    if sharded and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = resolve_dtype(cfg.dtype, device)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
    loaded = load_causal_lm(
        cfg.model, device, dtype, tokenizer, max_model_len, sharded=sharded, quantization=cfg.quantization
    )
    log.info(
        "base %s: %.1fM params, vocab %d, context %d, %s on %s%s",
        cfg.model, loaded.num_parameters / 1e6, loaded.vocab_size, loaded.max_model_len, dtype, device,
        f", {loaded.serving_quantization} weights" if loaded.serving_quantization else "",
    )  # fmt: skip  # one line per log argument would hide the message
    return loaded
