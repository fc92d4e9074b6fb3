"""The stages of building a memory, each one function: datastore → index → targets → train → eval.

`memdec memory <stage>` runs one of them; `memdec memory build` runs them all through its cache
(memories/build.py). Either way the same code runs, so a stage behaves the same on its own as in a build.
Each returns a JSON-able summary of what it made.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from memories import distributed
from memories.config import DatastoreConfig, EvalConfig, IndexConfig, ModelSpec, TargetsConfig, TrainConfig
from memories.corpus import corpus_files, tokenize_corpus
from memories.crosseval import Text, combine
from memories.datastore import Datastore, build_datastore
from memories.evaluate import evaluate, write_report
from memories.knn import (
    INDEX_NAME,
    build_index,
    build_index_sharded,
    load_index,
    save_index,
    set_nprobe,
    to_gpu_if_available,
)
from memories.manifest import Manifest, tokenizer_fingerprint
from memories.models import (
    context_length,
    load_causal_lm,
    load_tokenizer,
    model_id,
    model_identity,
    resolve_device,
    resolve_dtype,
)
from memories.perplexity import window_settings
from memories.shards import files_identity
from memories.targets import SparseTargets, build_targets
from memories.train import TrainError, TrainResult, train


class Base:
    """The base model a memory is built for: its tokenizer at once, its weights on first use (a build
    whose datastore is cached and that has no held-out file never loads them)."""

    def __init__(self, path: str, device: str = "auto", dtype: str = "auto") -> None:
        self.path = path
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.tokenizer = load_tokenizer(path)
        self.fingerprint = tokenizer_fingerprint(self.tokenizer)
        self._model: PreTrainedModel | None = None

    def check_tokenizer_of(self, memory: str | Path) -> None:
        """A memory must share this base's tokenizer: its token ids index the same vocabulary."""
        if tokenizer_fingerprint(load_tokenizer(memory)) != self.fingerprint:
            raise ValueError(f"{memory} uses a different tokenizer from {self.path}")

    @property
    def model(self) -> PreTrainedModel:
        if self._model is None:
            self._model = load_causal_lm(self.path, self.device, self.dtype)
        return self._model


def datastore_stage(base: Base, corpus: str, out: Path, config: DatastoreConfig,
                    progress: bool) -> dict[str, Any]:
    """Keys (the base's last-MLP inputs) and values (next tokens) over the corpus. Under torch.distributed
    rank 0 tokenizes the corpus and every rank forwards its shards of windows (memories.datastore); the
    summary that counts is rank 0's (the others have no corpus statistics)."""
    stats = None
    tokens = None
    if distributed.world().is_main:
        tokens, stats = tokenize_corpus(base.tokenizer, corpus, config.max_tokens, progress=progress)
    context, stride = window_settings(context_length(base.model), config.context, config.stride, clamp=True)
    meta = {"base_model": model_id(base.path), "tokenizer_fingerprint": base.fingerprint,
            "corpus": [str(p) for p in corpus_files(corpus)],
            "corpus_stats": stats.to_dict() if stats else {}}
    identity = {"base": model_identity(base.path), "dtype": str(base.dtype)}
    ds = build_datastore(base.model, tokens, out, context=context, stride=stride,
                         batch_size=config.batch_size, meta=meta, identity=identity, progress=progress)
    return {"entries": ds.size, "dim": ds.dim, "corpus_stats": meta["corpus_stats"],
            "seconds": ds.meta["seconds"]}


def index_stage(datastore: Path, out: Path, config: IndexConfig, progress: bool) -> dict[str, Any]:
    """A faiss index over the datastore's keys: built in one process, or trained once and filled by every
    rank under torch.distributed (memories.knn.build_index_sharded), with the same search results."""
    ds = Datastore.open(datastore)
    if distributed.world().distributed:
        identity = {"keys": files_identity(datastore / "keys.npy")}
        return build_index_sharded(ds.keys(), config, out, identity, progress=progress)
    index, info = build_index(ds.keys(), config, progress=progress)
    save_index(index, info, out)
    return info


def targets_stage(
    datastore: Path, index_dir: Path, out: Path, config: TargetsConfig, index: IndexConfig, progress: bool
) -> dict[str, Any]:
    """Sparse kNN distributions for every datastore position, searched with `index`'s nprobe and device.
    Under torch.distributed every rank loads the index (on its own GPU where there is one) and searches its
    shards of query rows (memories.targets)."""
    ds = Datastore.open(datastore)
    faiss_index, info = load_index(index_dir)
    set_nprobe(faiss_index, index.nprobe)
    faiss_index = to_gpu_if_available(faiss_index, index.use_gpu)
    identity = {"inputs": files_identity(datastore / "keys.npy", index_dir / INDEX_NAME),
                "nprobe": index.nprobe}
    tg = build_targets(faiss_index, ds.keys(), ds.values(), out, k=config.k, temperature=config.temperature,
                       batch_size=config.batch_size, progress=progress, identity=identity,
                       meta={"index": info, "datastore": str(datastore)})
    return {key: tg.meta[key] for key in ("num_rows", "nnz", "k", "temperature", "mean_support", "seconds")}


def train_stage(
    tokenizer: Any,
    out: Path,
    config: TrainConfig,
    *,
    datastore: Path | None = None,
    targets: Path | None = None,
    corpus: str | None = None,
    max_tokens: int | None = None,
    init_from: str | None = None,
    spec: ModelSpec | None = None,
    manifest: Manifest | None = None,
    **options: Any,
) -> TrainResult:
    """Train on a datastore's token stream and its kNN targets, or (β = 0) on a corpus alone.
    `options` go to `train` (checkpoint_dir, resume, keep_checkpoint, stop_after, progress)."""
    knn = None
    if datastore is not None:
        ds = Datastore.open(datastore)
        if ds.meta.get("tokenizer_fingerprint") not in (None, tokenizer_fingerprint(tokenizer)):
            raise TrainError(f"{datastore} was built with a different tokenizer")
        tokens = ds.tokens()
        if config.beta > 0:
            if targets is None:
                raise TrainError("--beta > 0 needs --targets (or use --beta 0)")
            knn = SparseTargets.open(targets)
    elif corpus is not None:
        tokens, _ = tokenize_corpus(tokenizer, corpus, max_tokens, progress=options.get("progress", True))
    else:
        raise TrainError("give --datastore/--targets, or --corpus with --beta 0")
    return train(config, out, tokenizer, tokens, knn, init_from=init_from, spec=None if init_from else spec,
                 manifest=manifest, **options)


def eval_stage(
    base: Base,
    memory: Path,
    texts: Sequence[Text],
    config: EvalConfig,
    report_dir: Path,
    progress: bool,
    title: str = "",
) -> dict[str, Any]:
    """Held-out perplexity of base, memory and mixture over α on each text, and the recommended α (from the
    cross-source texts when there are any: memories.crosseval); the report lands in `report_dir`."""
    if not texts:
        raise ValueError("no evaluation text")
    base.check_tokenizer_of(memory)
    mem_model = load_causal_lm(memory, base.device, base.dtype)
    reports = []
    for text in texts:
        tokens, _ = tokenize_corpus(base.tokenizer, text.path, config.max_tokens, progress=False)
        if progress:
            print(f"[memdec] eval: {text.label} ({text.kind}, {len(tokens)} tokens)", flush=True)
        rep = evaluate(base.model, mem_model, tokens, len(base.tokenizer), config, progress=progress)
        reports.append({"label": text.label, "kind": text.kind, "file": str(Path(text.path).resolve()),
                        **rep})
    report = combine(reports, config.alpha)
    write_report(report, report_dir, title)
    return report
