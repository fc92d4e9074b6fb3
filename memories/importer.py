"""`memdec memory import`: a published checkpoint (pickled `pytorch_model.bin`, or safetensors without a
manifest) made into a memory directory the server loads: safetensors weights, the base's tokenizer and a
`memdec.json` with the tokenizer fingerprint.

Pickles are read with `torch.load(weights_only=True)`, which rebuilds tensors and plain containers only and
refuses any other global (so a pickle that carries code is an error, never run). The server itself never
reads a pickle: this command is the one place they are opened, once, by the person who chose the file.
"""

from __future__ import annotations

import json
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from memories.manifest import (
    DEFAULT_TEMPERATURE,
    PAPER_ALPHA,
    Manifest,
    tokenizer_fingerprint,
    write_manifest,
)
from memories.models import (
    HUB_IMPORT_FILES,
    TOKENIZER_FILES,
    ModelLoadError,
    has_safetensors,
    load_tokenizer,
    model_id,
    pickled_weights,
    resolve_source,
)

_CONFIG_FILES = ("config.json", "generation_config.json")


class ImportRefusedError(ValueError):
    """The checkpoint cannot be imported: unsafe pickle, no weights, or a vocabulary the base cannot use."""


@dataclass(frozen=True)
class ImportResult:
    out: Path
    weights: list[str]  # the files the weights came from
    num_tensors: int
    converted: bool  # True: pickled weights were converted; False: safetensors were copied


def read_pickled_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A `pytorch_model*.bin` state dict, loaded with weights_only=True: anything but tensors and plain
    containers (a class, a function: code that would run while unpickling) is refused."""
    try:
        data: Any = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError, ValueError, EOFError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ImportRefusedError(
            f"{path} was refused: it is not a plain pickle of tensors (torch.load with weights_only=True "
            f"refused it, so nothing in it ran): {first[:300]}"
        ) from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and torch.is_tensor(v)
                                             for k, v in data.items()):
        raise ImportRefusedError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return data


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor contiguous and owning its storage (safetensors refuses shared storage, e.g. tied
    embeddings): the bytes are unchanged, a tensor that shares memory with another is copied."""
    seen: set[int] = set()
    out = {}
    for name, t in tensors.items():
        ptr = t.untyped_storage().data_ptr()
        if (ptr in seen or not t.is_contiguous() or t.storage_offset()
                or t.untyped_storage().nbytes() != t.nbytes):
            t = t.contiguous().clone()
        seen.add(ptr)
        out[name] = t
    return out


def _vocab_rows(config: dict[str, Any]) -> int | None:
    for key in ("vocab_size", "n_vocab", "padded_vocab_size"):
        value = config.get(key)
        if isinstance(value, int):
            return value
    text = config.get("text_config")
    return _vocab_rows(text) if isinstance(text, dict) else None


def import_checkpoint(
    source: str,
    out: Path,
    base: str,
    *,
    name: str | None = None,
    domain: str = "general",
    alpha: float = PAPER_ALPHA,
    temperature: float = DEFAULT_TEMPERATURE,
    description: str = "",
) -> ImportResult:
    """Write memory directory `out` from checkpoint `source` (a directory or hub id) for base `base`."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ImportRefusedError(f"{out} already exists and is not empty; choose a new directory")
    src = resolve_source(source, HUB_IMPORT_FILES)
    config_path = src / "config.json"
    if not config_path.is_file():
        raise ImportRefusedError(f"{source} has no config.json: not a Hugging Face model directory")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    base_tokenizer = load_tokenizer(base)
    base_fp = tokenizer_fingerprint(base_tokenizer)
    if any((src / f).exists() for f in TOKENIZER_FILES):
        try:
            own = tokenizer_fingerprint(load_tokenizer(str(src)))
        except ModelLoadError:
            own = None  # an unreadable tokenizer is replaced by the base's below; the vocabulary is checked
        if own is not None and own != base_fp:
            raise ImportRefusedError(
                f"{source} ships a tokenizer whose token->id map differs from the base {base}'s; a memory "
                "must use exactly the base model's tokenizer"
            )
    rows = _vocab_rows(config)
    if rows is not None and rows < len(base_tokenizer):
        raise ImportRefusedError(
            f"{source} scores {rows} tokens but the base {base}'s tokenizer has {len(base_tokenizer)}: it "
            "is not a memory for this base"
        )

    pickled = pickled_weights(src)
    staging = out.with_name(f".{out.name}.importing")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        if has_safetensors(src):
            files = sorted(src.glob("*.safetensors")) + sorted(src.glob("*.safetensors.index.json"))
            for f in files:
                shutil.copyfile(f, staging / f.name)
            num, converted, weights = _count_safetensors(staging), False, [f.name for f in files]
        elif pickled:
            from safetensors.torch import save_file

            state: dict[str, torch.Tensor] = {}
            for f in pickled:
                state.update(read_pickled_state_dict(f))
            save_file(_unshared(state), str(staging / "model.safetensors"), metadata={"format": "pt"})
            num, converted, weights = len(state), True, [f.name for f in pickled]
        else:
            raise ImportRefusedError(
                f"{source} holds no weights (neither *.safetensors nor pytorch_model*.bin)"
            )
        for conf in _CONFIG_FILES:
            if (src / conf).is_file():
                shutil.copyfile(src / conf, staging / conf)
        base_tokenizer.save_pretrained(str(staging))
        manifest = Manifest(
            name=name or out.name,
            tokenizer_fingerprint=base_fp,
            domain=domain,
            alpha=alpha,
            temperature=temperature,
            base_model=model_id(base),
            description=description,
            training={"imported_from": model_id(source), "weights": weights,
                      "converted_from_pickle": converted},
        )
        write_manifest(staging, manifest)
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ImportResult(out, weights, num, converted)


def _count_safetensors(directory: Path) -> int:
    from safetensors import safe_open

    count = 0
    for f in directory.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as handle:
            count += len(list(handle.keys()))
    return count
