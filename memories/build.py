"""`memdec memory build`: datastore → index → targets → train → eval, each stage cached.

Every stage has a cache key: the hash of its own settings plus the key of the stage it reads from.
A stage whose marker (`<work>/stages/<stage>.json`) holds the current key and whose outputs exist is
skipped; changing a setting re-runs that stage and everything downstream. Training checkpoints live
under a directory named after the train stage's key, so an interrupted build resumes its training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memories.corpus import corpus_files, corpus_identity, tokenize_corpus
from memories.datastore import Datastore, build_datastore
from memories.evaluate import EvalConfig, evaluate, write_report
from memories.knn import IndexConfig, build_index, load_index, save_index, set_nprobe, to_gpu_if_available
from memories.manifest import Manifest, read_manifest, tokenizer_fingerprint, write_manifest
from memories.models import (
    load_causal_lm,
    load_tokenizer,
    max_length,
    model_id,
    resolve_device,
    resolve_dtype,
)
from memories.targets import SparseTargets, build_targets
from memories.train import ModelSpec, TrainConfig, train


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
    max_tokens: int | None = None  # datastore/training corpus cut
    context: int | None = None  # datastore windows; None: 1024 or the base's maximum
    stride: int | None = None  # None: half the context
    batch_size: int = 8  # datastore windows per forward pass
    dtype: str = "auto"
    device: str = "auto"
    index: IndexConfig = field(default_factory=IndexConfig)
    k: int = 1024
    temperature: float = 1.0
    search_batch: int = 1024
    train: TrainConfig = field(default_factory=TrainConfig)
    init_from: str | None = None
    spec: ModelSpec | None = None
    eval: EvalConfig = field(default_factory=EvalConfig)
    eval_max_tokens: int | None = None

    @property
    def work_dir(self) -> Path:
        return Path(self.work) if self.work is not None else Path(str(self.out) + ".work")


def _hash(payload: Any) -> str:
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _model_identity(path: str) -> Any:
    """A local model directory by its files' sizes and mtimes; a hub id by name."""
    p = Path(path)
    if not p.is_dir():
        return path
    return [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(p.iterdir()) if f.is_file()]


@dataclass
class StageRecord:
    name: str
    key: str
    skipped: bool
    seconds: float
    summary: dict[str, Any]


class StageCache:
    def __init__(self, work: Path) -> None:
        self.dir = work / "stages"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.records: list[StageRecord] = []

    def run(
        self, name: str, settings: dict[str, Any], outputs_exist: Callable[[], bool], fn: Callable[[], dict]
    ) -> StageRecord:
        key = _hash(settings)
        marker = self.dir / f"{name}.json"
        if marker.is_file():
            saved = json.loads(marker.read_text(encoding="utf-8"))
            if saved.get("key") == key and outputs_exist():
                rec = StageRecord(name, key, True, 0.0, saved.get("summary", {}))
                self._say(f"[memdec] {name}: cached ({key}), skipped")
                self.records.append(rec)
                return rec
        marker.unlink(missing_ok=True)
        self._say(f"[memdec] {name}: running ({key})")
        started = time.perf_counter()
        summary = fn()
        seconds = round(time.perf_counter() - started, 2)
        payload = {"key": key, "settings": settings, "summary": summary, "seconds": seconds}
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
        tmp.replace(marker)
        rec = StageRecord(name, key, False, seconds, summary)
        self.records.append(rec)
        return rec

    def _say(self, msg: str) -> None:
        print(msg, flush=True)  # one line per stage even when progress bars are off


def build(config: BuildConfig, progress: bool = True) -> list[StageRecord]:
    """Run every stage that is not cached; returns one record per stage."""
    work = config.work_dir
    work.mkdir(parents=True, exist_ok=True)
    out = Path(config.out)
    cache = StageCache(work)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    tokenizer = load_tokenizer(config.base)
    fingerprint = tokenizer_fingerprint(tokenizer)
    ds_dir, idx_dir, tg_dir = work / "datastore", work / "index", work / "targets"
    base_model = None

    def base() -> Any:
        nonlocal base_model
        if base_model is None:
            base_model = load_causal_lm(config.base, device, dtype)
        return base_model

    # 1. datastore
    ds_settings = {
        "base": _model_identity(config.base),
        "corpus": corpus_identity(config.corpus),
        "max_tokens": config.max_tokens,
        "context": config.context,
        "stride": config.stride,
        "dtype": str(dtype),
    }

    def run_datastore() -> dict:
        model = base()
        tokens, stats = tokenize_corpus(tokenizer, config.corpus, config.max_tokens, progress=progress)
        context = min(config.context or 1024, max_length(model))
        ds = build_datastore(
            model, tokens, ds_dir, context=context, stride=config.stride or max(1, context // 2),
            batch_size=config.batch_size, progress=progress,
            meta={"base_model": model_id(config.base), "tokenizer_fingerprint": fingerprint,
                  "corpus": [str(p) for p in corpus_files(config.corpus)], "corpus_stats": stats.to_dict()},
        )
        return {"entries": ds.size, "dim": ds.dim, "corpus_stats": stats.to_dict(), "seconds": ds.meta["seconds"]}

    ds_rec = cache.run("datastore", ds_settings, lambda: (ds_dir / "datastore.json").is_file(), run_datastore)
    ds = Datastore.open(ds_dir)

    # 2. index
    index_settings = {"datastore": ds_rec.key, **dataclasses.asdict(config.index)}
    index_settings.pop("nprobe")
    index_settings.pop("use_gpu")

    def run_index() -> dict:
        index, info = build_index(ds.keys(), config.index, progress=progress)
        save_index(index, info, idx_dir)
        return info

    idx_rec = cache.run("index", index_settings, lambda: (idx_dir / "index.json").is_file(), run_index)

    # 3. targets
    tg_settings = {"index": idx_rec.key, "k": config.k, "temperature": config.temperature,
                   "nprobe": config.index.nprobe}

    def run_targets() -> dict:
        index, info = load_index(idx_dir)
        set_nprobe(index, config.index.nprobe)
        index = to_gpu_if_available(index, config.index.use_gpu)
        tg = build_targets(
            index, ds.keys(), ds.values(), tg_dir, k=config.k, temperature=config.temperature,
            batch_size=config.search_batch, progress=progress, meta={"index": info},
        )
        return {key: tg.meta[key] for key in ("num_rows", "nnz", "k", "temperature", "mean_support", "seconds")}

    tg_rec = cache.run("targets", tg_settings, lambda: (tg_dir / "targets.json").is_file(), run_targets)

    # 4. train
    tr_settings = {
        "targets": tg_rec.key,
        "train": config.train.trajectory_dict(),
        "init_from": _model_identity(config.init_from) if config.init_from else None,
        "spec": dataclasses.asdict(config.spec) if config.spec and not config.init_from else None,
    }
    tr_key = _hash(tr_settings)
    ckpt_dir = work / f"checkpoint-{tr_key}"
    for stale in work.glob("checkpoint-*"):
        if stale.name not in (ckpt_dir.name, ckpt_dir.name + ".old", ckpt_dir.name + ".tmp"):
            shutil.rmtree(stale, ignore_errors=True)

    def run_train() -> dict:
        manifest = Manifest(
            name=config.name, domain=config.domain, description=config.description,
            base_model=model_id(config.base), tokenizer_fingerprint=fingerprint,
        )
        result = train(
            dataclasses.replace(config.train, device=config.device), out, tokenizer, ds.tokens(),
            SparseTargets.open(tg_dir), init_from=config.init_from, spec=config.spec,
            checkpoint_dir=ckpt_dir, resume=True, keep_checkpoint=False, manifest=manifest, progress=progress,
        )
        return read_manifest(out).training | {"seconds": round(result.seconds, 2)}

    def train_outputs() -> bool:
        return (out / "memdec.json").is_file() and (out / "model.safetensors").is_file()

    tr_rec = cache.run("train", tr_settings, train_outputs, run_train)

    # 5. eval
    ev_rec = None
    if config.valid is not None:
        ev_settings = {
            "train": tr_rec.key, "valid": corpus_identity(config.valid), "max_tokens": config.eval_max_tokens,
            **dataclasses.asdict(config.eval),
        }

        def run_eval() -> dict:
            memory = load_causal_lm(out, device, dtype)
            tokens, _ = tokenize_corpus(tokenizer, config.valid, config.eval_max_tokens, progress=False)
            report = evaluate(base(), memory, tokens, len(tokenizer), config.eval, progress=progress)
            report["file"] = str(Path(config.valid).resolve())
            write_report(report, out, title=f"{config.name}: held-out perplexity ({config.domain})")
            return report

        ev_rec = cache.run("eval", ev_settings, lambda: (out / "evaluation.json").is_file(), run_eval)

    # The manifest is rebuilt from the stage records every time: cheap, and always consistent with them.
    manifest = read_manifest(out)
    corpus = {
        **ds_rec.summary.get("corpus_stats", {}),
        "datastore_entries": ds_rec.summary.get("entries"),
        "key_dim": ds_rec.summary.get("dim"),
        "index": {k: v for k, v in idx_rec.summary.items() if k != "seconds"},
        "k": tg_rec.summary.get("k"),
        "temperature": tg_rec.summary.get("temperature"),
        "mean_support": tg_rec.summary.get("mean_support"),
    }
    changes: dict[str, Any] = {
        "name": config.name, "domain": config.domain, "description": config.description,
        "base_model": model_id(config.base), "corpus": corpus,
    }
    if ev_rec is not None:
        changes.update(alpha=float(ev_rec.summary["best_alpha"]), evaluation=ev_rec.summary)
    write_manifest(out, manifest.replace(**changes))
    return cache.records
