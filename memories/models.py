"""The one model loader, for the server and the toolkit: devices, dtypes, tokenizers, causal LMs (local
directories, cached hub ids, or GGUF files: `memories.gguf`) and their context length.

Weights load from safetensors or GGUF only (never a pickle) and no repository code ever runs
(`trust_remote_code=False`). Every
failure to load is a ModelLoadError with the path in its message, so the toolkit's CLI prints one line
and the server answers a 4xx (or stops at start-up) instead of leaking a transformers exception.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from memories.config import DTYPE_CHOICES

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Where configs keep the position-table size, by architecture family (GPT-2 calls it n_positions).
_CONTEXT_ATTRS = ("max_position_embeddings", "n_positions", "max_seq_len", "max_sequence_length",
                  "seq_length")


class ModelLoadError(ValueError):
    """The model or tokenizer cannot be loaded, or is unusable."""


class PickledWeightsError(ModelLoadError):
    """The checkpoint's weights are pickled (`pytorch_model.bin`): never loaded; `memdec memory import`
    converts them."""


# `org/name` (or a bare `name`), optionally `@revision`: what the Hugging Face hub calls a model id.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?"
                     r"(@[A-Za-z0-9][A-Za-z0-9_./-]*)?$")
# What a served model needs from a hub repository: configs, safetensors weights, tokenizer files.
HUB_SERVE_FILES = ("*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja")
# `memdec memory import` also takes pickled weights (loaded with weights_only=True, never served).
HUB_IMPORT_FILES = (*HUB_SERVE_FILES, "pytorch_model*.bin")
PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model-*.bin")
# Files whose presence says a directory ships its own tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
IMPORT_HINT = "convert it once with `memdec memory import SOURCE OUT --base BASE` and serve OUT"


def looks_local(source: str) -> bool:
    """A path the user meant as a local directory or GGUF file: it exists, or it is spelt like a path."""
    try:
        return (
            source.startswith(("/", "./", "../", "~", "."))
            or source.lower().endswith(".gguf")
            or Path(source).expanduser().exists()
        )
    except (OSError, ValueError):
        return True  # unusable as a path, and no hub id either: `_check_path` explains


def is_hub_id(source: str) -> bool:
    """`org/name[@revision]` (or `name[@revision]`) that is not a local path."""
    return not looks_local(source) and _HUB_ID.match(source) is not None


def split_revision(hub_id: str) -> tuple[str, str | None]:
    """`org/name@rev` -> (`org/name`, `rev`); no `@`: (hub_id, None)."""
    repo, sep, revision = hub_id.partition("@")
    return repo, (revision or None) if sep else None


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_cache_dir() -> Path:
    """Where transformers looks for hub models, read now (not at import): $HF_HUB_CACHE, else $HF_HOME/hub,
    else huggingface_hub's default."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or transformers' TRANSFORMERS_OFFLINE), read now: only the local cache is used."""
    from huggingface_hub import constants

    return _env_flag("HF_HUB_OFFLINE") or _env_flag("TRANSFORMERS_OFFLINE") or bool(constants.HF_HUB_OFFLINE)


def resolve_source(source: str | Path, patterns: tuple[str, ...] = HUB_SERVE_FILES) -> Path:
    """The local directory of a model: `source` itself when it is a directory, else the snapshot of hub id
    `org/name[@revision]` in the Hugging Face cache (fetched when not cached and not offline, the files
    matching `patterns` only), as transformers resolves it. A GGUF model is its file, checked by
    `gguf.inspect`. ModelLoadError when none of these works."""
    source = str(source)
    if is_gguf_path(source):
        from memories import gguf  # imported here: it imports this module's ModelLoadError

        return gguf.inspect(source).path
    if not is_hub_id(source):
        _check_path(source)
        path = Path(source).expanduser()
        if not path.is_dir():
            raise _no_directory(source)
        return path
    repo, revision = split_revision(source)
    from huggingface_hub import snapshot_download

    offline = hub_offline()
    try:
        snapshot = snapshot_download(
            repo, revision=revision, cache_dir=str(hub_cache_dir()), local_files_only=offline,
            allow_patterns=list(patterns),
        )
    except Exception as exc:  # noqa: BLE001 - huggingface_hub raises many types (offline, 404, gated, network)
        where = f"the Hugging Face cache at {hub_cache_dir()}"
        if offline:
            reason = f"it is not in {where} and HF_HUB_OFFLINE is set"
        else:
            reason = f"it is not in {where} and fetching it failed ({type(exc).__name__}: {str(exc)[:300]})"
        raise ModelLoadError(
            f"{source!r} is neither a local directory nor a hub model memdec can reach: {reason}"
        ) from None
    return Path(snapshot)


def is_gguf_path(source: str | Path) -> bool:
    """A GGUF model: a local file named *.gguf (memories.gguf)."""
    return str(source).lower().endswith(".gguf")


def has_safetensors(directory: Path) -> bool:
    return any(directory.glob("*.safetensors"))


def pickled_weights(directory: Path) -> list[Path]:
    """The pickled weight files of a checkpoint directory (`pytorch_model.bin` or its shards)."""
    return sorted(p for pattern in PICKLED_WEIGHTS for p in directory.glob(pattern))


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


def _no_directory(path: str) -> ModelLoadError:
    return ModelLoadError(f"model directory {path!r} does not exist")


def _check_path(path: str) -> None:
    """A path that looks local must be a directory; an OS-unusable one (NUL, name too long) is our error."""
    try:
        local = path.startswith(("/", "./", "../", "~")) or Path(path).exists()
        if local and not Path(path).expanduser().is_dir():
            raise _no_directory(path)
    except (OSError, ValueError) as exc:
        if isinstance(exc, ModelLoadError):
            raise
        raise ModelLoadError(f"model path {path[:200]!r} cannot be used: {exc}") from None


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer of a local directory or hub id (`resolve_source`), or the one inside a GGUF file."""
    source = str(path)
    if is_gguf_path(source):
        from memories import gguf

        return gguf.load_tokenizer(source)
    directory = resolve_source(source)
    try:
        return AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)
    except Exception as exc:  # transformers raises many types for a bad directory
        raise ModelLoadError(f"cannot load a tokenizer from {source!r}: {exc}") from exc


def load_causal_lm(
    path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> PreTrainedModel:
    """A causal LM (local directory or hub id, `resolve_source`) from safetensors weights, or a GGUF file's
    weights dequantized to `dtype`, on `device`, in eval mode. Pickled weights are refused with the command
    that converts them."""
    source = str(path)
    if is_gguf_path(source):
        from memories import gguf

        model = gguf.load_model(source, dtype)
        move(model, device)
        return model.eval()
    local = resolve_source(source)
    if not has_safetensors(local):
        pickled = pickled_weights(local) or sorted(local.glob("pytorch_model*.bin.index.json"))
        if pickled:
            raise PickledWeightsError(
                f"{source} has pickled weights ({pickled[0].name}); memdec serves safetensors only (a pickle "
                f"can run code when loaded): {IMPORT_HINT}"
            )
        raise ModelLoadError(
            f"{source} has no *.safetensors weights; memdec serves safetensors only (no pickle). If its "
            f"weights are pytorch_model.bin (as some hub checkpoints are), {IMPORT_HINT}"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(str(local), dtype=dtype, use_safetensors=True,
                                                     trust_remote_code=False)
    except Exception as exc:
        raise ModelLoadError(f"cannot load a causal LM from {source!r}: {exc}") from exc
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


class VocabularyError(ModelLoadError):
    """The model's embeddings do not cover the tokenizer's vocabulary."""


def check_vocab(model: PreTrainedModel, vocab_size: int, path: str | Path) -> None:
    """The input and output layers must take and score every token of the tokenizer (padding rows beyond
    it are fine)."""
    for what, layer in (("output layer", model.get_output_embeddings()),
                        ("input embedding", model.get_input_embeddings())):
        rows = embedding_rows(layer)
        if rows < vocab_size:
            raise VocabularyError(
                f"{path}: the {what} has {rows} rows but the tokenizer has {vocab_size} tokens; "
                "the model cannot take or score every token"
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


def model_identity(path: str) -> Any:
    """A local model directory by its files' sizes and mtimes, a GGUF file by its own; a hub id by name (cache
    keys)."""
    p = Path(path)
    files = sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p] if p.is_file() else []
    if not files:
        return path
    return [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
