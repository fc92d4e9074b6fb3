"""Typed, frozen configuration, and the registry file that lists start-up memories. Pydantic is for the
HTTP schema only."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memories.config import DTYPE_CHOICES as DTYPES
from memories.mixing import check_alpha
from memories.quantize import SCHEMES as QUANTIZATION_SCHEMES


@dataclass(frozen=True)
class ModelConfig:
    model: str  # hub id, local directory or GGUF file
    dtype: str = "auto"  # auto = float32 on CPU, bfloat16 on CUDA when supported
    device: str = "auto"  # auto = cuda when available
    tokenizer: str | None = None  # where the tokenizer comes from instead of `model` (vLLM's --tokenizer)
    # Weight-only quantization on a CPU (vLLM's --quantization; memories.quantize): auto = a GGUF base in its
    # file's precision (Q4_* → int4, Q8_0 → int8), anything else unquantized. Memories follow the base's
    # scheme.
    quantization: str = "auto"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.quantization not in QUANTIZATION_SCHEMES:
            raise ValueError(f"quantization must be one of {QUANTIZATION_SCHEMES}, got {self.quantization!r}")


MAX_SPECULATIVE_TOKENS = 16  # past this a round's verify costs more than any acceptance rate repays
# `memdec serve`'s default K (the engine's own default is off, so library users and tests opt in).
# Chosen from bench/speculative.py on the demo models: see docs/performance.md.
DEFAULT_SPECULATIVE_TOKENS = 4


@dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = 64  # sequences decoding at once
    # tokens per step (vLLM's meaning): decode rows first, then prompt chunks
    max_num_batched_tokens: int = 8192
    # reuse cached full KV blocks of identical prompt prefixes (vLLM's flag)
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True  # split prompts longer than the step's token budget (vLLM's flag)
    max_model_len: int | None = None  # cap below the base model's own context
    use_cuda_streams: bool = True  # base and memory forwards on two streams when on CUDA
    enforce_eager: bool = False  # no CUDA graphs (vLLM's flag): decode runs the same step eagerly
    gpu_memory_utilization: float = 0.9  # fraction of the GPU's memory this process may use (vLLM's meaning)
    num_gpu_blocks_override: int | None = None  # KV pages, instead of measuring (vLLM's flag; any device)
    block_size: int = 16  # base tokens per KV page; memories fit as many tokens as the page's bytes allow
    speculative_tokens: int = 0  # K: drafts the memory proposes per round for the base to verify (0 = off)
    speculative_adaptive: bool = True  # choose 0..K per step from measured costs and acceptance

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 2:
            raise ValueError("num_gpu_blocks_override must be >= 2 (one page is scratch)")
        if self.block_size < 1:
            raise ValueError("block_size must be >= 1")
        if not 0 <= self.speculative_tokens <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"speculative_tokens must be in [0, {MAX_SPECULATIVE_TOKENS}]")


@dataclass(frozen=True)
class ParallelConfig:
    """Tensor parallelism (`server/tp.py`): the base sharded by heads over this many processes, one per
    GPU."""

    tensor_parallel_size: int = 1  # vLLM's --tensor-parallel-size
    # A rank that dies or leaves a step unfinished this long brings the server down (503, errors, exit
    # non-zero).
    timeout: float = 30.0

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError("tensor_parallel_size must be >= 1")
        if self.timeout <= 0:
            raise ValueError("the tensor-parallel timeout must be > 0 seconds")


@dataclass(frozen=True)
class MemorySpec:
    name: str
    path: str
    alpha: float | None = None  # None = the manifest's recommended alpha


@dataclass(frozen=True)
class ServerConfig:
    model: ModelConfig
    engine: EngineConfig = field(default_factory=EngineConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    memories: tuple[MemorySpec, ...] = ()
    registry_file: Path | None = None
    served_model_name: str | None = None  # default: `default_served_name(model.model)`
    chat_template: Path | None = None  # a Jinja file replacing the tokenizer's chat template
    host: str = "0.0.0.0"
    port: int = 8000
    max_queue: int = 256  # waiting requests beyond this get 429
    api_key: str | None = None
    admin_key: str | None = None
    enable_admin: bool = False  # admin endpoints without an admin key (trusted networks only)
    memory_root: Path | None = None  # hot-loaded memory paths must lie under it
    allow_hub_memories: bool = False  # with a memory root: hot-loads may also name hub ids
    persist_registry: bool = False  # runtime loads and unloads rewrite registry_file (atomically)
    shutdown_timeout: float = 30.0
    max_n: int = 16
    max_logprobs: int = 20
    max_body_bytes: int = 4 * 1024 * 1024
    log_prompts: bool = False


def default_served_name(model: str) -> str:
    """The base model's name in the API when --served-model-name is absent: a hub id as given, a local
    directory by its own name, a GGUF file by its name without `.gguf`, so that no client ever needs (or sees)
    a path on the server."""
    path = Path(model)
    if path.is_dir():
        return path.resolve().name
    return path.name[: -len(".gguf")] if path.name.lower().endswith(".gguf") and path.is_file() else model


class RegistryFileError(ValueError):
    """The --registry file is missing or malformed."""


def read_registry_file(path: Path, missing_ok: bool = False) -> tuple[MemorySpec, ...]:
    """A JSON list of {"name", "path", "alpha"?} (or {"memories": [...]}); relative paths are taken
    relative to the file's directory, and a path that is not a local one is a hub id (`org/name[@rev]`).
    `missing_ok`: a file that does not exist yet lists nothing (--persist-registry creates it)."""
    if missing_ok and not Path(path).exists():
        return ()
    try:
        data: Any = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise RegistryFileError(f"cannot read registry file {path}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise RegistryFileError(f"registry file {path} is not valid JSON: {exc}") from exc
    if isinstance(data, dict) and isinstance(data.get("memories"), list):
        data = data["memories"]
    if not isinstance(data, list):
        raise RegistryFileError(f"registry file {path} must hold a JSON list of {{name, path, alpha?}}")
    specs = []
    for i, item in enumerate(data):
        if (not isinstance(item, dict) or not isinstance(item.get("name"), str)
                or not isinstance(item.get("path"), str)):
            raise RegistryFileError(f"registry file {path}, entry {i}: needs string 'name' and 'path'")
        alpha = item.get("alpha")
        try:
            alpha = None if alpha is None else check_alpha(alpha)
        except ValueError as exc:
            raise RegistryFileError(f"registry file {path}, entry {i}: 'alpha': {exc}") from None
        specs.append(MemorySpec(item["name"], _entry_path(item["path"], Path(path)), alpha))
    return tuple(specs)


def _entry_path(given: str, registry: Path) -> str:
    """A registry entry's source: a local path (relative to the registry file's directory) or a hub id."""
    from memories.models import is_hub_id

    local = Path(given) if Path(given).is_absolute() else registry.resolve().parent / given
    if is_hub_id(given) and not local.exists():
        return given
    return str(local.resolve())


def write_registry_file(path: Path, specs: Iterable[MemorySpec]) -> None:
    """Replace the registry file atomically: the new list goes to a temporary file in the same directory,
    is flushed to disk, and takes the old one's name in one `os.replace`, so a reader (or a restart after a
    crash at any moment) sees the old file or the new one, never a part of either."""
    path = Path(path)
    entries = [{"name": s.name, "path": s.path, **({"alpha": s.alpha} if s.alpha is not None else {})}
               for s in specs]
    text = json.dumps(entries, indent=2, ensure_ascii=False) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.resolve().parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dir_fd = os.open(path.resolve().parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
