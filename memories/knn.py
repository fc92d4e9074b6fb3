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

from memories.config import IndexConfig
from memories.jsonfile import read_json, write_json

INDEX_NAME = "index.faiss"
INDEX_META = "index.json"


def gpu_count() -> int:
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


def _as_f32(block: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(block, dtype=np.float32)


def build_index(
    keys: np.ndarray, config: IndexConfig, chunk: int = 65_536, progress: bool = True
) -> tuple[faiss.Index, dict[str, Any]]:
    """An index over all rows of `keys` ([N, H], float16 memmap), ids = row numbers."""
    n, dim = keys.shape
    kind = config.resolved_kind(n)
    started = time.perf_counter()
    info: dict[str, Any] = {"kind": kind, "num_entries": int(n), "dim": int(dim)}
    index: Any  # faiss' SWIG classes: IndexFlatL2 or IndexIVFPQ
    if kind == "flat":
        index = faiss.IndexFlatL2(dim)
    else:
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
    for start in tqdm(range(0, n, chunk), desc=f"index ({kind})", disable=not progress):
        index.add(_as_f32(keys[start : start + chunk]))
    info["seconds"] = round(time.perf_counter() - started, 2)
    return index, info


def save_index(index: faiss.Index, info: dict[str, Any], out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(out_dir / INDEX_NAME))
    write_json(out_dir / INDEX_META, info)
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
    gpu_index: Any = faiss.index_cpu_to_gpu(resources, 0, index, options)
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
