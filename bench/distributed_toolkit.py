"""Per-stage throughput of `memdec memory build` in one process and under torchrun with two, side by side.

    python -m bench.distributed_toolkit [--docs 800] [--hidden 128] [--layers 4] [--steps 30] [--keep DIR]

Both runs build the same memory from the same random-init base and synthetic corpus (nothing downloaded),
one thread per process (OMP_NUM_THREADS=1), each in a fresh work directory; a stage's time is the one its
marker records (`<work>/stages/<stage>.json`), so process start-up and model loading are left out of the
stage columns and shown in the wall-clock row. The datastores, indexes and targets of the two runs are
compared byte for byte and the loss curves to 1e-5, so the table never reports a speed-up of a different
result. On a CPU the second process only helps when a second core is free: the table records the load
average beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import ROOT, write_result

STAGES = ("datastore", "index", "targets", "train")
COMPARED = ["datastore/keys.npy", "datastore/values.npy", "index/index.faiss", "targets/offsets.npy",
            "targets/token_ids.npy", "targets/probs.npy"]


def _inputs(root: Path, docs: int, hidden: int, layers: int) -> tuple[Path, Path]:
    from testkit.models import build_model, build_tokenizer
    from testkit.text import write_corpus

    tok = build_tokenizer(root / "tok")
    base = build_model(root / "base", tok, "llama", hidden=hidden, layers=layers, seed=1, max_len=512)
    return base, write_corpus(root / "train.txt", docs, seed=1)


def _run(nproc: int, argv: list[str]) -> float:
    """Wall seconds of one build: plain `python -m memories.cli` for one process, torchrun for more."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    started = time.perf_counter()
    subprocess.run(
        [*launcher, "-m", "memories.cli", *argv], env=env, check=True, capture_output=True, text=True
    )
    return time.perf_counter() - started


def _rates(work: Path) -> dict[str, dict[str, float]]:
    """Each stage's seconds and items per second (keys, keys, target rows, training tokens)."""
    out = {}
    for stage in STAGES:
        rec = json.loads((work / "stages" / f"{stage}.json").read_text())
        s = rec["summary"]
        items = {"datastore": s.get("entries"), "index": s.get("num_entries"), "targets": s.get("num_rows"),
                 "train": s.get("tokens_seen")}[stage]
        out[stage] = {
            "seconds": rec["seconds"],
            "items": items,
            "per_second": items / max(rec["seconds"], 1e-9),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=800, help="synthetic corpus documents")
    ap.add_argument("--hidden", type=int, default=128, help="base hidden size")
    ap.add_argument("--layers", type=int, default=4, help="base layers")
    ap.add_argument("--steps", type=int, default=30, help="training steps")
    ap.add_argument("--keep", default=None, help="work in this directory and keep it (default: a temp dir)")
    args = ap.parse_args()
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="memdec-dist-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    base, corpus = _inputs(root, args.docs, args.hidden, args.layers)
    common = ["memory", "build", "--base", str(base), "--corpus", str(corpus), "--name", "bench",
              "--context", "256", "--batch-size", "4", "--index", "ivfpq", "--nlist", "64",
              "--code-size", "16", "--k", "64", "--search-batch", "256", "--hidden-size", "128",
              "--layers", "2", "--heads", "4", "--max-len", "256", "--seq-len", "128",
              "--train-batch-size", "8", "--max-steps", str(args.steps),
              "--quiet"]  # fmt: skip  # flag/value pairs on one line
    load = os.getloadavg()
    results = {}
    for nproc in (1, 2):
        out = root / f"p{nproc}"
        wall = _run(nproc, [*common, "--out", str(out)])
        results[nproc] = {"wall_seconds": round(wall, 2), "stages": _rates(Path(f"{out}.work")), "out": out}
    one, two = (Path(f"{results[n]['out']}.work") for n in (1, 2))
    same = all((one / f).read_bytes() == (two / f).read_bytes() for f in COMPARED)
    losses = [
        np.array(json.loads((results[n]["out"] / "training_log.json").read_text())["loss"]) for n in (1, 2)
    ]
    loss_diff = float(np.abs(losses[0] - losses[1]).max())

    print(f"memdec memory build, 1 process vs torchrun 2 processes (1 thread each; load average before: "
          f"{load[0]:.2f} on {os.cpu_count()} cores)")
    print(f"  {'stage':<10} {'items':>8} {'1 proc /s':>11} {'2 procs /s':>11} {'speed-up':>9}")
    for stage in STAGES:
        a, b = results[1]["stages"][stage], results[2]["stages"][stage]
        print(f"  {stage:<10} {a['items']:>8} {a['per_second']:>11.0f} {b['per_second']:>11.0f} "
              f"{a['seconds'] / max(b['seconds'], 1e-9):>8.2f}x")
    print(
        f"  {'wall':<10} {'':>8} {results[1]['wall_seconds']:>10.1f}s {results[2]['wall_seconds']:>10.1f}s "
        f"{results[1]['wall_seconds'] / results[2]['wall_seconds']:>8.2f}x  "
        f"(start-up and model loading included)"
    )
    print(f"  datastore, index and targets byte-identical: {same}; max |Δ loss| over {len(losses[0])} steps: "
          f"{loss_diff:.1e}")
    for n in (1, 2):
        results[n].pop("out")
    write_result("distributed_toolkit", {"load_average": load, "args": vars(args), "results": results,
                                         "identical": same, "max_loss_diff": loss_diff})


if __name__ == "__main__":
    main()
