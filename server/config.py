"""Typed, frozen configuration. Pydantic is for the HTTP schema only."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

DTYPES = ("auto", "bfloat16", "float16", "float32")


@dataclass(frozen=True)
class ModelConfig:
    model: str  # hub id or local directory
    dtype: str = "auto"  # auto = float32 on CPU, bfloat16 on CUDA when supported
    device: str = "auto"  # auto = cuda when available

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")


@dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = 64  # sequences decoding at once
    max_num_batched_tokens: int = 8192  # prompt tokens admitted per prefill step (a longer prompt runs alone)
    max_model_len: int | None = None  # cap below the base model's own context
    use_cuda_streams: bool = True  # base and memory forwards on two streams when on CUDA
    enforce_eager: bool = False  # no CUDA graphs (vLLM's flag): decode runs the same step eagerly
    gpu_memory_utilization: float = 0.9  # fraction of the GPU's memory this process may use (vLLM's meaning)
    num_gpu_blocks_override: int | None = None  # KV pages, instead of measuring (vLLM's flag; any device)
    block_size: int = 16  # base tokens per KV page; memories fit as many tokens as the page's bytes allow

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


@dataclass(frozen=True)
class MemorySpec:
    name: str
    path: str
    alpha: float | None = None  # None = the manifest's recommended alpha


@dataclass(frozen=True)
class ServerConfig:
    model: ModelConfig
    engine: EngineConfig = field(default_factory=EngineConfig)
    memories: tuple[MemorySpec, ...] = ()
    registry_file: Path | None = None
    served_model_name: str | None = None  # defaults to the --model string
    host: str = "0.0.0.0"
    port: int = 8000
    max_queue: int = 256  # waiting requests beyond this get 429
    api_key: str | None = None
    admin_key: str | None = None
    enable_admin: bool = False  # admin endpoints without an admin key (trusted networks only)
    memory_root: Path | None = None  # hot-loaded memory paths must lie under it
    shutdown_timeout: float = 30.0
    max_n: int = 16
    max_logprobs: int = 20
    max_body_bytes: int = 4 * 1024 * 1024
    log_prompts: bool = False
