"""`memdec memory build`: datastore → index → targets → train → eval, each stage cached.

Every stage has a cache key: the hash of its own settings plus the key of the stage it reads from.
A stage whose marker (`<work>/stages/<stage>.json`) holds the current key and whose outputs exist is
skipped; changing a setting re-runs that stage and everything downstream. Training checkpoints live
under a directory named after the train stage's key, so an interrupted build resumes its training.

Under torchrun every rank runs `build`: rank 0 alone reads and writes the markers and says what runs, and
its decision and summary are broadcast, so all ranks run the same stages and hold the same records.
Datastore, index, targets and train run on every rank (memories.distributed); the held-out evaluation
and the manifest are rank 0's, the other ranks ending after training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memories import distributed
from memories.config import BuildConfig
from memories.corpus import corpus_identity
from memories.crosseval import CROSS_SOURCE, IN_SOURCE, Text
from memories.evaluate import recommended_alpha
from memories.jsonfile import read_json, write_json
from memories.manifest import Manifest, read_manifest, write_manifest
from memories.models import model_id, model_identity
from memories.sources import FILES, holdout_split, load_spec
from memories.stages import Base, datastore_stage, eval_stage, index_stage, targets_stage, train_stage

__all__ = ["BuildConfig", "StageRecord", "build"]


def _hash(payload: Any) -> str:
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


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
        self,
        name: str,
        settings: dict[str, Any],
        outputs_exist: Callable[[], bool],
        fn: Callable[[], dict],
        every_rank: bool = True,
    ) -> StageRecord:
        """Run or skip stage `name` on every rank (rank 0 decides and its summary is broadcast), or with
        `every_rank=False` on rank 0 alone (the evaluation, after the other ranks have ended)."""
        key = _hash(settings)
        share = distributed.broadcast if every_rank else (lambda obj, _what: obj)
        marker = self.dir / f"{name}.json"
        main = distributed.world().is_main
        cached = None
        if main and marker.is_file():
            saved = read_json(marker)
            if saved.get("key") == key and outputs_exist():
                cached = saved.get("summary", {})
        cached = share(cached, f"deciding whether {name} is cached")
        if cached is not None:
            rec = StageRecord(name, key, True, 0.0, cached)
            self._say(f"[memdec] {name}: cached ({key}), skipped")
            self.records.append(rec)
            return rec
        if main:
            marker.unlink(missing_ok=True)
        self._say(f"[memdec] {name}: running ({key})")
        started = time.perf_counter()
        summary = share(fn(), f"finishing {name}")  # rank 0's summary is the stage's
        seconds = round(time.perf_counter() - started, 2)
        if main:
            write_json(marker, {"key": key, "settings": settings, "summary": summary, "seconds": seconds})
        rec = StageRecord(name, key, False, seconds, summary)
        self.records.append(rec)
        return rec

    def _say(self, msg: str) -> None:
        if distributed.world().is_main:
            print(msg, flush=True)  # one line per stage even when progress bars are off


def build(config: BuildConfig, progress: bool = True) -> list[StageRecord]:
    """Run every stage that is not cached; returns one record per stage."""
    work = config.work_dir
    out = Path(config.out)
    cache = StageCache(work)
    base = Base(config.base, config.datastore.device, config.datastore.dtype)
    ds_dir, idx_dir, tg_dir = work / "datastore", work / "index", work / "targets"
    dsc = config.datastore
    # Rank 0 alone writes the held-out split's files; the others take its paths.
    inputs = _inputs(config) if distributed.world().is_main else None
    corpus, texts = distributed.broadcast(inputs, "splitting sources")  # type: ignore[misc]
    ds_settings = {"base": model_identity(config.base), "corpus": corpus_identity(corpus),
                   "max_tokens": dsc.max_tokens, "context": dsc.context, "stride": dsc.stride,
                   "dtype": str(base.dtype)}
    ds_rec = cache.run("datastore", ds_settings, lambda: (ds_dir / "datastore.json").is_file(),
                       lambda: datastore_stage(base, corpus, ds_dir, dsc, progress))
    idx_rec = cache.run("index", {"datastore": ds_rec.key, **config.index.build_settings()},
                        lambda: (idx_dir / "index.json").is_file(),
                        lambda: index_stage(ds_dir, idx_dir, config.index, progress))
    tg_settings = {"index": idx_rec.key, "k": config.targets.k, "temperature": config.targets.temperature,
                   "nprobe": config.index.nprobe}
    tg_rec = cache.run("targets", tg_settings, lambda: (tg_dir / "targets.json").is_file(),
                       lambda: targets_stage(ds_dir, idx_dir, tg_dir, config.targets, config.index, progress))
    tr_rec = _train(cache, config, base, tg_rec.key, progress)
    if not distributed.world().is_main:
        return cache.records  # evaluation and the manifest are rank 0's
    ev_rec = None
    if texts:
        ev_settings = {"train": tr_rec.key,
                       "texts": [(t.label, t.kind, corpus_identity(t.path)) for t in texts],
                       **dataclasses.asdict(config.eval)}
        title = f"{config.name}: held-out perplexity ({config.domain})"
        ev_rec = cache.run("eval", ev_settings, lambda: (out / "evaluation.json").is_file(),
                           lambda: eval_stage(base, out, texts, config.eval, out, progress, title),
                           every_rank=False)
    _write_manifest(config, ds_rec, idx_rec, tg_rec, ev_rec)
    return cache.records


def _inputs(config: BuildConfig) -> tuple[str, list[Text]]:
    """The datastore's corpus and the evaluation texts. With sources: the kept sources' text (interleaved) and
    one text per source, cross-source for the held-out ones. Without: the corpus, and the valid file as
    in-source text (nothing says it comes from other sources)."""
    if config.sources is None and not config.holdout:
        return config.corpus, [Text(Path(config.valid).stem, config.valid, IN_SOURCE)] if config.valid else []
    spec = None if config.sources in (None, FILES) else load_spec(config.sources, config.domain)
    split = holdout_split(config.corpus, config.valid, config.holdout, config.work_dir / "sources", spec)
    texts = [Text(name, str(path), CROSS_SOURCE) for name, path in split.heldout.items()]
    texts += [Text(name, str(path), IN_SOURCE) for name, path in split.in_source.items()]
    return str(split.datastore), texts


def _train(cache: StageCache, config: BuildConfig, base: Base, targets_key: str,
           progress: bool) -> StageRecord:
    """The train stage. Its checkpoints live under a directory named after its key, so an interrupted
    build resumes its own training and a changed setting never resumes a stale one."""
    work, out = config.work_dir, Path(config.out)
    settings = {
        "targets": targets_key,
        "train": config.train.trajectory_dict(),
        "init_from": model_identity(config.init_from) if config.init_from else None,
        "spec": dataclasses.asdict(config.spec) if config.spec and not config.init_from else None,
    }
    ckpt_dir = work / f"checkpoint-{_hash(settings)}"
    for stale in work.glob("checkpoint-*") if distributed.world().is_main else ():
        if stale.name not in (ckpt_dir.name, ckpt_dir.name + ".old", ckpt_dir.name + ".tmp"):
            shutil.rmtree(stale, ignore_errors=True)

    def run() -> dict:
        manifest = Manifest(name=config.name, domain=config.domain, description=config.description,
                            base_model=model_id(config.base), tokenizer_fingerprint=base.fingerprint)
        result = train_stage(base.tokenizer, out, config.train, datastore=work / "datastore",
                             targets=work / "targets", init_from=config.init_from, spec=config.spec,
                             manifest=manifest, checkpoint_dir=ckpt_dir, resume=True, keep_checkpoint=False,
                             progress=progress)
        return read_manifest(out).training | {"seconds": round(result.seconds, 2)}

    def outputs() -> bool:
        return (out / "memdec.json").is_file() and (out / "model.safetensors").is_file()

    return cache.run("train", settings, outputs, run)


def _write_manifest(
    config: BuildConfig, ds: StageRecord, idx: StageRecord, tg: StageRecord, ev: StageRecord | None
) -> None:
    """Rebuilt from the stage records every time: cheap, and always consistent with them."""
    out = Path(config.out)
    corpus = {
        **ds.summary.get("corpus_stats", {}),
        "datastore_entries": ds.summary.get("entries"),
        "key_dim": ds.summary.get("dim"),
        "index": {k: v for k, v in idx.summary.items() if k != "seconds"},
        "k": tg.summary.get("k"),
        "temperature": tg.summary.get("temperature"),
        "mean_support": tg.summary.get("mean_support"),
        "holdout_sources": list(config.holdout),
    }
    changes: dict[str, Any] = {
        "name": config.name, "domain": config.domain, "description": config.description,
        "base_model": model_id(config.base), "corpus": corpus,
    }
    if ev is not None:
        changes.update(alpha=recommended_alpha(ev.summary), evaluation=ev.summary)
    write_manifest(out, read_manifest(out).replace(**changes))
