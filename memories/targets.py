"""Sparse kNN target distributions, one per datastore entry.

p_kNN(t | position i) = Σ_{j ∈ kNN(i), values[j] = t} softmax_j(−d_ij / τ), with d the squared L2
distance from faiss and the position's own entry excluded. Only the tokens with non-zero mass are
stored, CSR-style:
  offsets.npy    int64   [N+1]  row i spans offsets[i]:offsets[i+1]
  token_ids.npy  int32   [nnz]  sorted within a row
  probs.npy      float16 [nnz]  summing to 1 per row (up to float16 rounding)
  targets.json   metadata; written last
Rows are streamed to disk batch by batch; no vocabulary-sized array exists at any point. While the stage
runs, `targets.shards/` holds each shard's rows (memories.shards); the files above are the same whatever
the number of processes that searched them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from memories import distributed
from memories.jsonfile import read_marker, write_json
from memories.knn import search_excluding_self
from memories.shards import ShardLedger, row_shards

META_NAME = "targets.json"


class TargetsError(ValueError):
    """The targets directory is missing or incomplete."""


def knn_distribution(
    dists: np.ndarray, neighbour_ids: np.ndarray, values: np.ndarray, temperature: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-row sparse p_kNN from neighbour distances: (counts [Q], token_ids [nnz], probs [nnz] float32).

    dists, neighbour_ids: [Q, k]; id −1 marks a missing neighbour (ignored). Within a row the
    tokens come out sorted ascending and unique; entries whose probability is exactly 0 in float16
    are left out, as they would be stored as 0 anyway.
    """
    q, k = dists.shape
    valid = neighbour_ids >= 0  # [Q, k]
    logits = np.where(valid, -dists.astype(np.float64) / temperature, -np.inf)  # [Q, k]
    top = logits.max(axis=1, keepdims=True)  # [Q, 1]
    top[~np.isfinite(top)] = 0.0  # rows without any neighbour stay all-zero
    weights = np.exp(logits - top)  # [Q, k]
    norm = weights.sum(axis=1, keepdims=True)
    probs = weights / np.where(norm > 0, norm, 1.0)  # [Q, k]
    tokens = np.where(valid, values[np.where(valid, neighbour_ids, 0)], -1).astype(np.int64)  # [Q, k]
    # Sort tokens within each row, then sum the probabilities of each run of equal tokens.
    order = np.argsort(tokens, axis=1, kind="stable")
    tokens = np.take_along_axis(tokens, order, axis=1).ravel()  # [Q*k]
    probs = np.take_along_axis(probs, order, axis=1).ravel()  # [Q*k]
    starts = np.ones(q * k, dtype=bool)
    starts[1:] = tokens[1:] != tokens[:-1]
    starts[::k] = True  # a row never continues the previous row's run
    run_start = np.flatnonzero(starts)
    run_token = tokens[run_start]
    run_prob = np.add.reduceat(probs, run_start)
    run_row = run_start // k
    keep = (run_token >= 0) & (run_prob.astype(np.float16) > 0)
    counts = np.bincount(run_row[keep], minlength=q)
    return counts, run_token[keep].astype(np.int32), run_prob[keep].astype(np.float32)


def build_targets(
    index: Any,
    keys: np.ndarray,
    values: np.ndarray,
    out_dir: str | Path,
    *,
    k: int = 1024,
    temperature: float = 1.0,
    batch_size: int = 1024,
    meta: dict[str, Any] | None = None,
    identity: dict[str, Any] | None = None,
    progress: bool = True,
) -> SparseTargets:
    """Search every key's neighbours (itself excluded) and stream sparse p_kNN rows to `out_dir`.

    The query rows are cut into shards of whole search batches (the batches one process makes, so every
    search is the same call), dealt out to the ranks under torch.distributed. Each shard streams its rows
    to `targets.shards/<i>.*`; once all are done they are stitched by offsets into the same files one
    process writes, each rank copying its own shards into place. Finished shards are recorded
    (memories.shards): a re-run after a failure searches only the others. `identity` (the index's and
    keys' files) joins k, τ and the batch size in what a shard must match.
    """
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    out_dir = Path(out_dir)
    w = distributed.world()
    n = len(keys)
    k = min(k, n - 1)
    if k < 1:
        raise ValueError("the datastore needs at least 2 entries to find neighbours")
    if w.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / META_NAME).unlink(missing_ok=True)
    ledger = ShardLedger(out_dir, "targets", {"num_rows": int(n), "k": int(k),
                                              "temperature": float(temperature),
                                              "batch_size": int(batch_size), **(identity or {})})
    ledger.open()
    values = np.asarray(values, dtype=np.int64)
    shards = row_shards(n, batch_size)
    mine = ledger.pending(len(shards))
    started = time.perf_counter()
    bar = tqdm(total=sum(shards[i][1] - shards[i][0] for i in mine), desc=f"targets (k={k})", unit="row",
               disable=not (progress and w.is_main))
    for done, i in enumerate(mine, start=1):
        _search_shard(index, keys, values, ledger, i, shards[i], k, temperature, batch_size)
        bar.update(shards[i][1] - shards[i][0])
        distributed.fault_point("targets", done)
    bar.close()
    distributed.barrier("searching neighbours")
    nnz = _stitch(out_dir, ledger, len(shards))
    sizes = np.diff(np.load(out_dir / "offsets.npy"))
    info = {
        "num_rows": int(n),
        "nnz": nnz,
        "k": int(k),
        "temperature": float(temperature),
        "distance": "squared_l2",
        "mean_support": round(float(sizes.mean()), 2),
        "max_support": int(sizes.max()),
        "empty_rows": int((sizes == 0).sum()),
        "seconds": round(time.perf_counter() - started, 2),
        **(meta or {}),
    }
    if w.is_main:
        write_json(out_dir / META_NAME, info)
        ledger.remove()
    distributed.barrier("finishing the targets")
    return SparseTargets.open(out_dir)


def _search_shard(
    index: Any, keys: np.ndarray, values: np.ndarray, ledger: ShardLedger, i: int, rows: tuple[int, int],
    k: int, temperature: float, batch_size: int,
) -> None:
    """Rows [a, b)'s sparse p_kNN streamed to targets.shards/<i>.tok, .prob and .counts.npy, then its
    marker."""
    a, b = rows
    base = ledger.dir / f"{i:05d}"
    counts = np.zeros(b - a, dtype=np.int64)
    nnz = 0
    with open(f"{base}.tok", "wb") as ftok, open(f"{base}.prob", "wb") as fprob:
        for start in range(a, b, batch_size):
            stop = min(b, start + batch_size)
            dist, ids = search_excluding_self(index, keys[start:stop], np.arange(start, stop), k)
            row_counts, toks, probs = knn_distribution(dist, ids, values, temperature)
            counts[start - a : stop - a] = row_counts
            ftok.write(toks.tobytes())
            fprob.write(probs.astype(np.float16).tobytes())
            nnz += len(toks)
    np.save(f"{base}.counts.npy", counts)
    ledger.finish(i, {"rows": [a, b], "nnz": nnz})


def _stitch(out_dir: Path, ledger: ShardLedger, num_shards: int) -> int:
    """The shards' rows as offsets.npy, token_ids.npy and probs.npy; returns nnz. Rank 0 lays the files
    out from every shard's counts; each rank then copies its shards' entries in at their offsets."""
    w = distributed.world()
    nnz_of = [int(ledger.info(i)["nnz"]) for i in range(num_shards)]
    first = np.concatenate([[0], np.cumsum(nnz_of)]).astype(np.int64)  # [S+1] first entry of each shard
    nnz = int(first[-1])
    if w.is_main:
        counts = np.concatenate([np.load(ledger.dir / f"{i:05d}.counts.npy") for i in range(num_shards)])
        offsets = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        np.save(out_dir / "offsets.npy", offsets)
        for name, dtype in (("token_ids.npy", np.int32), ("probs.npy", np.float16)):
            np.lib.format.open_memmap(out_dir / name, mode="w+", dtype=dtype, shape=(nnz,)).flush()
    distributed.barrier("laying out the targets")
    if nnz:  # an empty array cannot be memory-mapped (and has nothing to copy)
        for name, ext, dtype in (("token_ids.npy", "tok", np.int32), ("probs.npy", "prob", np.float16)):
            dest = np.load(out_dir / name, mmap_mode="r+")
            for i in w.assigned(num_shards):
                if nnz_of[i]:
                    src = np.memmap(ledger.dir / f"{i:05d}.{ext}", dtype=dtype, mode="r", shape=(nnz_of[i],))
                    dest[first[i] : first[i + 1]] = src
                    del src
            dest.flush()
            del dest
    distributed.barrier("stitching the targets")
    return nnz


@dataclass(frozen=True)
class SparseTargets:
    path: Path
    meta: dict[str, Any]
    offsets: np.ndarray  # [N+1] int64
    token_ids: np.ndarray  # [nnz] int32 (memmap)
    probs: np.ndarray  # [nnz] float16 (memmap)

    @classmethod
    def open(cls, path: str | Path) -> SparseTargets:
        path = Path(path)
        return cls(
            path,
            read_marker(path / META_NAME, TargetsError, "kNN targets"),
            np.load(path / "offsets.npy"),
            np.load(path / "token_ids.npy", mmap_mode="r"),
            np.load(path / "probs.npy", mmap_mode="r"),
        )

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return np.asarray(self.token_ids[a:b]), np.asarray(self.probs[a:b])

    def padded(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows as padded arrays (ids int64 [R, K_max], probs float32 [R, K_max]); padding has prob 0.

        K_max is the largest support among these rows (at most k), never the vocabulary size. Each
        row is renormalised in float32 so that float16 storage error does not bias the KL.
        """
        rows = np.asarray(rows, dtype=np.int64)
        starts, ends = self.offsets[rows], self.offsets[rows + 1]
        sizes = ends - starts  # [R]
        k_max = max(int(sizes.max(initial=0)), 1)
        if len(self.token_ids) == 0:
            return np.zeros((len(rows), k_max), np.int64), np.zeros((len(rows), k_max), np.float32)
        col = np.arange(k_max)[None, :]  # [1, K]
        mask = col < sizes[:, None]  # [R, K]
        flat = np.where(mask, starts[:, None] + col, 0)  # [R, K]
        ids = np.where(mask, self.token_ids[flat.ravel()].reshape(flat.shape), 0).astype(np.int64)
        probs = np.where(mask, self.probs[flat.ravel()].reshape(flat.shape), 0).astype(np.float32)
        total = probs.sum(axis=1, keepdims=True)
        return ids, probs / np.where(total > 0, total, np.float32(1.0))
