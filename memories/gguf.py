"""GGUF files (llama.cpp's format) as models: a base, a memory, or a toolkit's `--base` / `--init-from`.

transformers reads GGUF itself (`from_pretrained(directory, gguf_file=name)`), taking the config, the
tokenizer and its chat template from the file's metadata and dequantizing the weights to the dtype asked for.
What it does badly is fail: a truncated file is a numpy reshape error, a wrong magic an IndexError, an
architecture it cannot map a ValueError from deep inside. So every GGUF is `inspect`ed first, by reading its
header with the `gguf` package, and a file that would fail is a ModelLoadError naming it.

Invariants: a GGUF model is a local *file* whose name ends in `.gguf` (never a directory, never a hub id);
its tokenizer is always the one inside it; what it was quantized to (`GGUFInfo.quantization`) is read from the
header, never guessed from the name.
"""

from __future__ import annotations

import collections
import contextlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from memories.models import ModelLoadError

MAGIC = b"GGUF"
# transformers' list also holds metadata sections that are no architectures.
_NOT_ARCHITECTURES = {"general", "tokenizer"}


@dataclass(frozen=True)
class GGUFInfo:
    path: Path
    architecture: str  # general.architecture, as llama.cpp names it (llama, qwen2, …)
    quantization: str  # llama.cpp's file type without its MOSTLY_ prefix: Q4_1, Q8_0, F16, F32 …
    name: str | None  # general.name
    tensors: int


def _reader(path: Path) -> Any:
    try:
        import gguf
    except ImportError:
        raise ModelLoadError(
            f"{path}: reading a GGUF file needs the `gguf` package (pip install gguf)"
        ) from None
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != MAGIC:
        raise ModelLoadError(f"{path} is not a GGUF file (it starts with {magic!r}, not {MAGIC!r})")
    try:
        return gguf.GGUFReader(path)
    except Exception as exc:  # noqa: BLE001 - the reader fails on bad files with whatever numpy raises
        raise ModelLoadError(
            f"{path}: cannot read this GGUF file (truncated or corrupt?): {type(exc).__name__}: {exc}"
        ) from None


def _field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def _supported_architectures() -> set[str]:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return set(GGUF_SUPPORTED_ARCHITECTURES) - _NOT_ARCHITECTURES


def inspect(source: str | Path) -> GGUFInfo:
    """The file's header, checked: it exists, is GGUF, is whole (every tensor's bytes are in the file) and
    holds an architecture transformers can load. ModelLoadError naming the file otherwise."""
    path = Path(source).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"GGUF file {str(source)!r} does not exist")
    reader = _reader(path)
    size = path.stat().st_size
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if not reader.tensors or end > size:
        raise ModelLoadError(f"{path}: truncated GGUF file ({size} bytes; its tensors need {end})")
    arch = _field(reader, "general.architecture")
    if not isinstance(arch, str):
        raise ModelLoadError(f"{path}: the GGUF header names no architecture (general.architecture)")
    supported = _supported_architectures()
    if arch not in supported:
        raise ModelLoadError(
            f"{path}: architecture {arch!r} cannot be loaded from GGUF by transformers "
            f"(it reads {', '.join(sorted(supported))})"
        )
    name = _field(reader, "general.name")
    return GGUFInfo(path=path, architecture=arch, quantization=_quantization(reader),
                    name=name if isinstance(name, str) else None, tensors=len(reader.tensors))


def _quantization(reader: Any) -> str:
    """general.file_type's name (MOSTLY_Q4_1 -> Q4_1); without one, the type most of the matrices have."""
    import gguf

    file_type = _field(reader, "general.file_type")
    with contextlib.suppress(ValueError, TypeError):
        if file_type is not None:
            return gguf.LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    kinds = collections.Counter(t.tensor_type.name for t in reader.tensors if len(t.shape) >= 2)
    return kinds.most_common(1)[0][0] if kinds else "unknown"


def _quietly(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """transformers prints a progress bar while it dequantizes; a server log or `--quiet` wants none."""
    with contextlib.redirect_stderr(io.StringIO()):
        return fn(*args, **kwargs)


def load_tokenizer(source: str | Path) -> Any:
    """The tokenizer (and chat template) stored in the file."""
    from transformers import AutoTokenizer

    info = inspect(source)
    try:
        return _quietly(AutoTokenizer.from_pretrained, str(info.path.parent), gguf_file=info.path.name)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for bad metadata
        raise ModelLoadError(f"{source}: cannot read the tokenizer from this GGUF file: {exc}") from None


def load_model(source: str | Path, dtype: torch.dtype) -> Any:
    """The causal LM, its weights dequantized to `dtype`. The dequantized model is an ordinary one: the config
    keeps no quantization_config (nothing is quantized any more, and a saved copy must not claim so)."""
    from transformers import AutoModelForCausalLM

    info = inspect(source)
    try:
        model = _quietly(
            AutoModelForCausalLM.from_pretrained, str(info.path.parent), gguf_file=info.path.name, dtype=dtype
        )
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"{source}: cannot load a causal LM from this GGUF file: {exc}") from None
    with contextlib.suppress(AttributeError):
        del model.config.quantization_config
    # Nor does the model keep transformers' GGUF quantizer: with it, save_pretrained refuses ("not
    # serializable", e.g. a memory trained --init-from a GGUF) and .half()/.float() raise. Kept only while
    # weights stay packed.
    if not getattr(getattr(model, "hf_quantizer", None), "packed_modules", None):
        model.hf_quantizer = None
    model.config.name_or_path = str(info.path)
    return model
