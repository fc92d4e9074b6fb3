"""Typed, frozen settings of the toolkit's stages. The CLI's flag defaults are read from these, so a
default is written once. Nothing heavy is imported here: the server's CLI builds the toolkit's parser
without faiss, matplotlib or the models."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")  # auto: bf16/fp16 on GPU, fp32 on CPU
FLAT_MAX_ENTRIES = 200_000  # above this an exact search over every key costs too much for `auto`
DEFAULT_ALPHAS = tuple(round(0.05 * i, 2) for i in range(1, 20))  # 0.05 … 0.95


def _fields_except(config: Any, *names: str) -> dict[str, Any]:
    """A config's fields as a dict, less those that do not change what a stage produces (cache keys)."""
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in names}


@dataclass(frozen=True)
class DatastoreConfig:
    max_tokens: int | None = None  # use only the first N corpus tokens
    context: int | None = None  # window length; None: 1024 or the base's maximum
    stride: int | None = None  # None: half the context
    batch_size: int = 8  # windows per forward pass
    dtype: str = "auto"  # of the base model, for the datastore and evaluation
    device: str = "auto"


@dataclass(frozen=True)
class IndexConfig:
    kind: str = "auto"  # auto | flat | ivfpq
    nlist: int = 0  # IVF cells; 0 = about 4·sqrt(N), a power of two
    code_size: int = 32  # PQ bytes per vector (sub-quantisers of 8 bits); must divide the key dim
    nprobe: int = 32  # cells visited per query
    train_size: int = 0  # keys sampled to train IVF-PQ; 0 = 64 per cell, at most 1M
    seed: int = 0
    use_gpu: bool = True  # use faiss GPU when this faiss build has GPUs

    def resolved_kind(self, num_entries: int) -> str:
        if self.kind == "auto":
            return "flat" if num_entries <= FLAT_MAX_ENTRIES else "ivfpq"
        if self.kind not in ("flat", "ivfpq"):
            raise ValueError(f"unknown index kind {self.kind!r}; choose auto, flat or ivfpq")
        return self.kind

    def resolved_nlist(self, num_entries: int) -> int:
        if self.nlist > 0:
            return self.nlist
        target = 4 * int(math.sqrt(max(num_entries, 1)))
        return int(2 ** max(3, round(math.log2(max(target, 8)))))

    def build_settings(self) -> dict[str, Any]:
        """The fields that shape the index itself (nprobe and the device only change how it is searched)."""
        return _fields_except(self, "nprobe", "use_gpu")


@dataclass(frozen=True)
class TargetsConfig:
    k: int = 1024  # neighbours per position
    temperature: float = 1.0  # τ in softmax(−d/τ), d = squared L2 distance between keys
    batch_size: int = 1024  # queries per faiss search call


@dataclass(frozen=True)
class TrainConfig:
    beta: float = 0.5
    seq_len: int = 512
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: float = 0.05  # < 1: fraction of the optimizer steps; >= 1: a number of steps
    min_lr_ratio: float = 0.1  # cosine decay ends at lr·min_lr_ratio
    max_grad_norm: float = 1.0
    epochs: float = 1.0
    max_steps: int = 0  # > 0 overrides epochs
    seed: int = 0
    save_every: int = 200  # optimizer steps between checkpoints (0: only at the end / on stop)
    device: str = "auto"

    def trajectory_dict(self) -> dict[str, Any]:
        """The fields that determine the training trajectory (a checkpoint must match them to resume)."""
        return _fields_except(self, "save_every", "device")


@dataclass(frozen=True)
class ModelSpec:
    """A new memory built from a config, using the base tokenizer."""

    arch: str = "llama"  # llama | qwen2
    hidden_size: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 0  # 0: same as heads
    intermediate_size: int = 0  # 0: 8/3·hidden rounded up to a multiple of 32 (Llama's ratio)
    max_len: int = 1024
    tie_embeddings: bool = True
    # A model of the same tokenizer (the base) whose input embedding, projected onto its top `hidden_size`
    # singular directions, starts the new model's embedding (and tied output layer); None: random.
    embeddings_from: str | None = None


@dataclass(frozen=True)
class EvalConfig:
    context: int | None = None  # None: 1024, or less where a model accepts less
    stride: int | None = None  # None: half the context
    alphas: tuple[float, ...] = DEFAULT_ALPHAS
    max_tokens: int | None = None  # score only the first tokens of each held-out text
    alpha: float | None = None  # recommend this α instead of one read off the curves (e.g. from other builds)


@dataclass(frozen=True)
class BuildConfig:
    base: str
    corpus: str
    out: Path
    name: str
    valid: str | None = None
    work: Path | None = None  # None: "<out>.work" beside the memory directory
    domain: str = "general"
    description: str = ""
    datastore: DatastoreConfig = field(default_factory=DatastoreConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    targets: TargetsConfig = field(default_factory=TargetsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    init_from: str | None = None
    spec: ModelSpec | None = None
    eval: EvalConfig = field(default_factory=EvalConfig)
    # Sources (memories/sources.py): a line-range JSON, or "files" (each file of a directory corpus is one).
    sources: str | None = None
    holdout: tuple[str, ...] = ()  # sources kept out of the datastore; α is chosen on their held-out text

    @property
    def work_dir(self) -> Path:
        return Path(self.work) if self.work is not None else Path(str(self.out) + ".work")
