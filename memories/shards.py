"""Shard completion markers: what lets a re-run after a killed rank redo only the unfinished shards.

A stage that runs in shards keeps `<out>/<stage>.shards/`: `plan.json` (the identity of the work: every
setting and input that shapes a shard's output) and `<i>.json` per finished shard, written (atomically) only
after that shard's output is on disk. Invariants:
- A shard marker is trusted only under a `plan.json` equal to the current identity; any difference and
  rank 0 clears the directory, so no shard of other settings is ever reused.
- Shard boundaries are a function of the identity alone (never of the world size), so markers written at
  one world size are valid at another.
- The stage removes the directory once its own completion marker is written; a complete stage has no
  `<stage>.shards/`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from memories import distributed
from memories.jsonfile import read_json, write_json

PLAN = "plan.json"


def digest(array: np.ndarray) -> str:
    """A content hash of an array (the token stream a datastore is built over)."""
    h = hashlib.blake2b(digest_size=16)
    flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    for start in range(0, len(flat), 1 << 26):
        h.update(flat[start : start + (1 << 26)].tobytes())
    return h.hexdigest()


# A shard is a few minutes of work for one GPU at most, and a small corpus still makes enough shards to
# keep dozens of ranks busy. Neither number changes a stage's output, only how it is dealt out.
SHARD_POSITIONS = 262_144
MIN_SHARDS = 64


def _target(total: int) -> int:
    return max(1, min(SHARD_POSITIONS, -(-total // MIN_SHARDS)))


def files_identity(*paths: Path) -> list[tuple[str, int, int]]:
    """Files by name, size and mtime: what a shard plan holds of a stage's inputs (keys, index)."""
    return [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in paths]


def group_units(unit_sizes: Sequence[int]) -> list[tuple[int, int]]:
    """Consecutive work units (forward batches of windows) grouped into shards of about `_target` positions
    each, every shard at least one unit: [(first unit, end unit)]."""
    target = _target(sum(unit_sizes))
    shards, start, acc = [], 0, 0
    for i, size in enumerate(unit_sizes):
        if acc and acc + size > target:
            shards.append((start, i))
            start, acc = i, 0
        acc += size
    if start < len(unit_sizes):
        shards.append((start, len(unit_sizes)))
    return shards


def row_shards(n: int, unit: int = 1) -> list[tuple[int, int]]:
    """Rows [0, n) in shards made of whole `unit`s (so a shard's search batches are one process's)."""
    size = unit * max(1, _target(n) // unit)
    return [(a, min(n, a + size)) for a in range(0, n, size)]


class ShardLedger:
    def __init__(self, out_dir: Path, stage: str, identity: dict[str, Any]) -> None:
        self.stage = stage
        self.dir = out_dir / f"{stage}.shards"  # per stage: the index may share the datastore's directory
        self.identity = identity

    def open(
        self, prepare: Callable[[], None] | None = None, intact: Callable[[], bool] | None = None
    ) -> None:
        """Rank 0 keeps the markers of the same work (when `intact` says its output files are still there)
        and otherwise clears them and calls `prepare` (lay out fresh output files) before writing the plan,
        so a plan on disk always has its files; every rank waits for that."""
        if distributed.world().is_main:
            plan = self.dir / PLAN
            same = plan.is_file() and read_json(plan) == _jsonable(self.identity)
            if not (same and (intact is None or intact())):
                shutil.rmtree(self.dir, ignore_errors=True)
                if prepare is not None:
                    prepare()
                write_json(plan, self.identity)
        distributed.barrier(f"opening {self.dir}")

    def pending(self, num_shards: int) -> list[int]:
        """This rank's shards that no earlier run finished; rank 0 says how many an earlier run left done."""
        w = distributed.world()
        if w.is_main:
            finished = sum(self.done(i) for i in range(num_shards))
            if finished:
                print(f"[memdec] {self.stage}: {finished} of {num_shards} shards done by an earlier run, "
                      f"{num_shards - finished} to go", flush=True)
        mine = [i for i in w.assigned(num_shards) if not self.done(i)]
        distributed.barrier(f"reading {self.dir}")  # no rank starts a shard while another still counts
        return mine

    def done(self, i: int) -> bool:
        return (self.dir / f"{i:05d}.json").is_file()

    def info(self, i: int) -> dict[str, Any]:
        return dict(read_json(self.dir / f"{i:05d}.json"))

    def finish(self, i: int, info: dict[str, Any]) -> None:
        write_json(self.dir / f"{i:05d}.json", info)

    def remove(self) -> None:
        if distributed.world().is_main:
            shutil.rmtree(self.dir, ignore_errors=True)


def _jsonable(obj: Any) -> Any:
    """`obj` as it reads back from JSON (tuples become lists), for comparing with a saved plan."""
    return json.loads(json.dumps(obj, default=str))
