"""The kNN-LM datastore: key = base hidden state at the last MLP input, value = the next token.

Layout of a datastore directory (all `.npy`, memory-mapped on read):
  tokens.npy   int32  [N]      the corpus token stream (EOS after each document)
  keys.npy     float16 [N-1, H] keys[i] = last-MLP input at position i, having seen tokens[..i]
  values.npy   int32  [N-1]    values[i] = tokens[i + 1]
  datastore.json               metadata; written last, so its presence means the store is complete
  datastore.shards/            while it is being built: which shards are done (memories.shards)
Entry i therefore lines up with input position i of the token stream, which is how training finds the
kNN target of every position it predicts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm
from transformers import PreTrainedModel

from memories import distributed
from memories.hooks import capture_mlp_input
from memories.jsonfile import read_marker, write_json
from memories.perplexity import Window, sliding_windows, window_batches
from memories.shards import ShardLedger, digest, group_units

META_NAME = "datastore.json"


class DatastoreError(ValueError):
    """The datastore directory is missing or incomplete."""


@dataclass(frozen=True)
class Datastore:
    path: Path
    meta: dict[str, Any]

    @classmethod
    def open(cls, path: str | Path) -> Datastore:
        path = Path(path)
        return cls(path, read_marker(path / META_NAME, DatastoreError, "datastore"))

    @property
    def size(self) -> int:
        return int(self.meta["num_entries"])

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    def keys(self) -> np.ndarray:
        return np.load(self.path / "keys.npy", mmap_mode="r")  # [N-1, H] float16

    def values(self) -> np.ndarray:
        return np.load(self.path / "values.npy", mmap_mode="r")  # [N-1] int32

    def tokens(self) -> np.ndarray:
        return np.load(self.path / "tokens.npy", mmap_mode="r")  # [N] int32


def _write_keys(keys: np.ndarray, hidden: torch.Tensor, w: Window) -> int:
    """Store the keys window `w` computes ([T, H] hidden states): position p, predicting tokens[p+1], for the
    targets the window scores (score_from..end-1). Returns how many were written."""
    first, last = w.score_from - 1, w.end - 1
    chunk = hidden[first - w.begin : last - w.begin].to(torch.float16)  # [S, H]
    if not torch.isfinite(chunk).all():
        raise DatastoreError(
            f"keys at positions {first}..{last - 1} overflow float16 (or the model produced NaN); "
            "this base model's last-MLP inputs do not fit the float16 datastore"
        )
    keys[first:last] = chunk.cpu().numpy()
    return last - first


@torch.inference_mode()
def build_datastore(
    model: PreTrainedModel,
    tokens: np.ndarray | None,
    out_dir: str | Path,
    *,
    context: int,
    stride: int,
    batch_size: int = 8,
    meta: dict[str, Any] | None = None,
    identity: dict[str, Any] | None = None,
    progress: bool = True,
) -> Datastore:
    """Run `model` over `tokens` in sliding windows and write every position's key and value.

    Windows follow the perplexity protocol: each position gets a key exactly once, computed in the
    window that gives it the most left context (at least context - stride tokens once past the start).

    Under torch.distributed (memories.distributed) the forward batches, the same ones one process makes,
    are grouped into shards dealt out to the ranks; each rank writes its rows into the one memmapped
    keys.npy rank 0 laid out, so the files are byte-identical to one process's whatever the world size.
    Only rank 0 needs `tokens` (the others read tokens.npy once it is written). Finished shards are
    recorded (memories.shards), so a re-run after a failure computes only the others; `identity` (the base
    model's files, its dtype) joins the token stream and the window settings in what a shard must match.
    """
    if stride >= context:
        # The position just before a window's first token would get no key (its hidden state lies outside
        # every window), leaving a zero row that kNN search would then return.
        raise DatastoreError(f"stride ({stride}) must be smaller than the window ({context}) for a datastore")
    out_dir = Path(out_dir)
    w = distributed.world()
    device = next(model.parameters()).device
    dim = int(model.config.hidden_size)
    ledger = ShardLedger(out_dir, "datastore", {})
    if w.is_main:
        if tokens is None:
            raise ValueError("rank 0 needs the token stream")
        tokens = np.asarray(tokens, dtype=np.int32)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / META_NAME).unlink(missing_ok=True)  # an interrupted rebuild must not look complete
        ledger.identity = {"tokens": digest(tokens), "num_tokens": len(tokens), "dim": dim,
                           "context": context, "stride": stride, "batch_size": batch_size,
                           **(identity or {})}
    ledger.open(prepare=lambda: _lay_out(out_dir, tokens, dim), intact=lambda: _laid_out(out_dir, dim))
    if tokens is None:
        tokens = np.load(out_dir / "tokens.npy", mmap_mode="r")
    n = int(len(tokens))
    batches = list(window_batches(sliding_windows(n, context, stride), max_windows=batch_size))
    shards = group_units([sum(win.end - win.score_from for win in b) for b in batches])
    mine = ledger.pending(len(shards))
    keys = np.load(out_dir / "keys.npy", mmap_mode="r+")  # [N-1, H] float16, rows disjoint between ranks
    ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64), device=device)  # [N]
    started = time.perf_counter()
    todo = sum(win.end - win.score_from for i in mine for b in batches[slice(*shards[i])] for win in b)
    bar = tqdm(total=todo, desc="datastore", unit="key", disable=not (progress and w.is_main))
    with capture_mlp_input(model) as capture:
        for done, i in enumerate(mine, start=1):
            written = 0
            for batch in batches[slice(*shards[i])]:
                # Only the hook's capture is needed: keep a single position's logits.
                # [B, T]
                model(input_ids=torch.stack([ids[win.begin : win.end] for win in batch]), logits_to_keep=1)
                for row, win in zip(capture.take(), batch, strict=True):  # the hook's [B, T, H]
                    written += _write_keys(keys, row, win)
            keys.flush()  # the marker below promises these rows are on disk
            ledger.finish(i, {"keys": written})
            bar.update(written)
            distributed.fault_point("datastore", done)
    bar.close()
    del keys
    distributed.barrier("computing datastore keys")
    info = {
        "num_entries": n - 1,
        "num_tokens": n,
        "dim": dim,
        "context": context,
        "stride": stride,
        "seconds": round(time.perf_counter() - started, 2),
        **(meta or {}),
    }
    if w.is_main:
        write_json(out_dir / META_NAME, info)
        ledger.remove()
    distributed.barrier("finishing the datastore")
    return Datastore(out_dir, info)


def _lay_out(out_dir: Path, tokens: np.ndarray | None, dim: int) -> None:
    """tokens.npy, values.npy and an all-zero keys.npy of the final shape, for the ranks to fill."""
    assert tokens is not None
    n = len(tokens)
    np.save(out_dir / "tokens.npy", tokens)
    np.save(out_dir / "values.npy", np.asarray(tokens[1:], dtype=np.int32))
    np.lib.format.open_memmap(out_dir / "keys.npy", mode="w+", dtype=np.float16, shape=(n - 1, dim)).flush()


def _laid_out(out_dir: Path, dim: int) -> bool:
    """The files `_lay_out` makes are there with the right shapes (a plan without them is not resumed)."""
    try:
        keys = np.load(out_dir / "keys.npy", mmap_mode="r")
        tokens = np.load(out_dir / "tokens.npy", mmap_mode="r")
    except (OSError, ValueError):
        return False
    return keys.shape == (len(tokens) - 1, dim) and (out_dir / "values.npy").is_file()
