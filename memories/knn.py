"""faiss indexes over datastore keys, and neighbour search that leaves out the query's own entry.

Distances are faiss L2 distances, i.e. *squared* Euclidean distances ||q - k||^2 (exact for Flat,
PQ-approximated for IVF-PQ), the quantity kNN-LM and Memory Decoder put through softmax(-d / τ).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from tqdm import tqdm

from memories import distributed
from memories.config import IndexConfig
from memories.jsonfile import read_json, write_json
from memories.shards import ShardLedger, row_shards

INDEX_NAME = "index.faiss"
INDEX_META = "index.json"


def gpu_count() -> int:
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


def _as_f32(block: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(block, dtype=np.float32)


def _empty_index(keys: np.ndarray, config: IndexConfig) -> tuple[Any, dict[str, Any]]:
    """The index before any key is added: Flat, or IVF-PQ trained on a seeded sample of `keys`."""
    n, dim = keys.shape
    kind = config.resolved_kind(n)
    info: dict[str, Any] = {"kind": kind, "num_entries": int(n), "dim": int(dim)}
    if kind == "flat":
        return faiss.IndexFlatL2(dim), info
    nlist = config.resolved_nlist(n)
    if dim % config.code_size:
        raise ValueError(f"code_size {config.code_size} must divide the key dimension {dim}")
    if n < nlist * 39:
        raise ValueError(
            f"IVF-PQ with nlist={nlist} needs at least {nlist * 39} keys to train, the datastore has {n}; "
            "lower --nlist or use --index flat"
        )
    index = faiss.IndexIVFPQ(faiss.IndexFlatL2(dim), dim, nlist, config.code_size, 8)
    train_n = min(n, config.train_size or min(1_000_000, max(nlist * 64, 256 * 39)))
    rng = np.random.default_rng(config.seed)
    sample = np.sort(rng.choice(n, size=train_n, replace=False))
    # IVF-PQ's k-means draws its own samples with faiss' RNG; fixing the seed keeps builds reproducible.
    index.cp.seed = config.seed
    index.pq.cp.seed = config.seed
    index.train(_as_f32(keys[sample]))
    index.nprobe = min(config.nprobe, nlist)
    info.update(nlist=nlist, code_size=config.code_size, nprobe=index.nprobe, train_size=int(train_n))
    return index, info


def build_index(
    keys: np.ndarray, config: IndexConfig, chunk: int = 65_536, progress: bool = True
) -> tuple[faiss.Index, dict[str, Any]]:
    """An index over all rows of `keys` ([N, H], float16 memmap), ids = row numbers."""
    started = time.perf_counter()
    index, info = _empty_index(keys, config)
    for start in tqdm(range(0, len(keys), chunk), desc=f"index ({info['kind']})", disable=not progress):
        index.add(_as_f32(keys[start : start + chunk]))
    info["seconds"] = round(time.perf_counter() - started, 2)
    return index, info


def build_index_sharded(
    keys: np.ndarray, config: IndexConfig, out_dir: str | Path, identity: dict[str, Any],
    progress: bool = True,
) -> dict[str, Any]:
    """`build_index` across the ranks of torch.distributed, saved to `out_dir`; returns its info.

    Rank 0 trains the index once (the same seeded sample as one process) and saves it empty; every rank
    encodes its shards' rows with it (faiss `sa_encode`: the coarse list and PQ code of each key, or the raw
    vector for Flat) into index.shards/; rank 0 adds the codes in row order (`add_sa_codes`, ids = row
    numbers). A key's code depends on the trained index alone, never on the keys encoded with it, so the
    result is one process's index, byte for byte. Finished shards are recorded (memories.shards) for a
    re-run after a failure.
    """
    out_dir = Path(out_dir)
    w = distributed.world()
    started = time.perf_counter()
    ledger = ShardLedger(out_dir, "index", {**identity, **config.build_settings()})
    if w.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / INDEX_META).unlink(missing_ok=True)

    def train() -> None:
        ledger.dir.mkdir(parents=True, exist_ok=True)
        index, info = _empty_index(keys, config)
        faiss.write_index(index, str(ledger.dir / "trained.faiss"))
        write_json(ledger.dir / "trained.json", info)

    ledger.open(prepare=train, intact=lambda: (ledger.dir / "trained.json").is_file())
    info = read_json(ledger.dir / "trained.json")
    trained = faiss.read_index(str(ledger.dir / "trained.faiss"))
    shards = row_shards(len(keys))
    mine = ledger.pending(len(shards))
    bar = tqdm(mine, desc=f"index ({info['kind']})", unit="shard", disable=not (progress and w.is_main))
    for done, i in enumerate(bar, start=1):
        a, b = shards[i]
        # [rows, code bytes]
        np.save(ledger.dir / f"{i:05d}.codes.npy", trained.sa_encode(_as_f32(keys[a:b])))
        ledger.finish(i, {"rows": [a, b]})
        distributed.fault_point("index", done)
    distributed.barrier("encoding keys for the index")
    if w.is_main:
        for i, (a, b) in enumerate(shards):
            codes = np.load(ledger.dir / f"{i:05d}.codes.npy")
            # A flat index's ids are its row order; IVF lists carry them.
            trained.add_sa_codes(codes, None if info["kind"] == "flat" else np.arange(a, b, dtype=np.int64))
        info["seconds"] = round(time.perf_counter() - started, 2)
        save_index(trained, info, out_dir)
        ledger.remove()
    return distributed.broadcast(info, "merging the index")


def save_index(index: faiss.Index, info: dict[str, Any], out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(out_dir / INDEX_NAME))
    write_json(out_dir / INDEX_META, info)  # last: its presence means the index is complete
    return out_dir / INDEX_NAME


def load_index(out_dir: str | Path) -> tuple[faiss.Index, dict[str, Any]]:
    out_dir = Path(out_dir)
    index = faiss.read_index(str(out_dir / INDEX_NAME))
    return index, read_json(out_dir / INDEX_META)


def set_nprobe(index: Any, nprobe: int) -> None:
    """nprobe on a CPU or GPU IVF index (no-op for Flat)."""
    if isinstance(index, faiss.Index) and faiss.try_extract_index_ivf(index) is not None:
        faiss.extract_index_ivf(index).nprobe = nprobe
    elif hasattr(index, "nprobe"):
        index.nprobe = nprobe


def to_gpu_if_available(index: faiss.Index, use_gpu: bool = True) -> faiss.Index:
    """A GPU copy of the index when this faiss build sees a GPU; the CPU index otherwise."""
    if not use_gpu or gpu_count() == 0:
        return index
    options = faiss.GpuClonerOptions()
    options.useFloat16 = True  # large PQ code sizes need float16 lookup tables on the GPU
    resources = faiss.StandardGpuResources()
    device = distributed.world().local_rank % gpu_count()  # under torchrun: this rank's GPU
    gpu_index: Any = faiss.index_cpu_to_gpu(resources, device, index, options)
    gpu_index.referenced_objects = [resources]  # the GPU index must not outlive its resources
    return gpu_index


def search_excluding_self(
    index: Any, queries: np.ndarray, query_ids: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """k neighbours of each query, never the query's own entry: (D [Q, k] float32, I [Q, k] int64).

    The search asks for k + 1 and removes the hit whose id equals the query's id, wherever it ranks
    (duplicate keys can tie with it at distance 0, so "drop the first hit" would be wrong). When the
    approximate search did not return the query itself, the (k+1)-th hit is dropped instead. Missing
    results (fewer than k reachable keys) come back as id -1 with distance +inf.
    """
    q = len(queries)
    dist, ids = index.search(_as_f32(queries), k + 1)  # [Q, k+1] each
    own = ids == query_ids.astype(np.int64)[:, None]  # [Q, k+1]
    no_self = ~own.any(axis=1)
    own[no_self, k] = True  # drop the worst hit where the query itself was not returned
    keep = ~own
    dist = dist[keep].reshape(q, k)
    ids = ids[keep].reshape(q, k)
    dist[ids < 0] = np.inf
    return dist, ids
