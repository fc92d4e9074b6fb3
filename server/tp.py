"""Tensor parallelism: the base sharded by attention heads over N processes that run its every forward
in lockstep, on inputs rank 0 broadcasts.

Rank 0 is the server: HTTP, scheduler, memories, mixing and sampling, and its share of the base. Ranks
1..N-1 (`python -m server.tp`, started by rank 0: `server/distributed.py`) hold only their share of the
base and of its KV cache. Each builds the same `ModelRunner` as rank 0 (same code, same order: the page
count they agree on, the same KV layout for its own heads, the same decode and verify graphs), then
waits for step descriptors: whenever rank 0's runner touches the base (the KV tables a step changed, a
packed prefill, a decode, a speculative verify, perplexity windows) it first broadcasts what that needs
(`Op`) on the gloo control group, then runs it; every rank runs the identical forward, whose row-parallel
layers all-reduce over the default group (NCCL on GPUs, inside the captured graphs too). Every rank's
output layer gathers the whole vocabulary's logits (transformers' `colwise_gather_output`); rank 0 uses
them and the others drop them.

Descriptors are host data (token ids, positions, pages, block tables; pickled, a few KB) except what
already lives on rank 0's device: the decode step's last tokens (sampled there) and a verify's drafts,
broadcast device to device on the default group, so rank 0 never waits for its own device to send them.

The sharding is transformers' own plan (`from_pretrained(tp_plan="auto")`: q/k/v and gate/up split by
output (whole heads per rank), o and down by input with an all-reduce), so any model transformers can
shard serves sharded; the base's KV heads must divide by N (each rank caches kv_heads / N heads).

Memories run on rank 0 only, whole, on its device, as without tensor parallelism: they are small (the
paper's memory for the whole Qwen family is 0.5B), sharding a model of a few layers would cost more in
collectives per layer than it saves in compute, and replicating them on every rank would spend every
other GPU's memory on copies whose outputs only rank 0 mixes. So hot-swap, per-memory failure
containment, the side stream and memory decode graphs are rank 0's business and unchanged; workers never
hear of memories.

Failure: rank 0's watchdog thread (`TensorParallel`) polls the workers and the step in flight every
0.2 s. A worker that exits, a step whose base forwards (device work included: the step ends with its host
sync) are unfinished after `--tensor-parallel-timeout` seconds, or a base operation that raises, is fatal:
callers get an error, /health answers 503, and rank 0 exits with code 3 within the bound plus a second's
grace (`os._exit`: a thread stuck in a collective cannot be joined). Workers die with rank 0
(`server/distributed.py`). SIGTERM drains as without tensor parallelism, then stops the workers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from enum import IntEnum
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from memories.perplexity import Window, batch_distributions, batch_logprobs
from server.config import EngineConfig, ModelConfig, ParallelConfig
from server.distributed import (
    Group,
    WorkerSpec,
    die_with_parent,
    join,
    open_store,
    spawn_workers,
    stop_workers,
)
from server.kv import ModelKV

log = logging.getLogger(__name__)

FAILURE_EXIT_CODE = 3  # a tensor-parallel rank died or hung
FAILURE_GRACE = 1.0  # seconds for error responses to reach clients before the process exits


class Op(IntEnum):
    FLUSH = 1  # (new pages, table entries, lengths) of the base's KV: `ModelKV.pending_updates`
    PREFILL = 2  # `runner.PrefillInputs`
    DECODE = 3  # (slots, longest) + the last-token buffer [S+1] (device broadcast)
    VERIFY = 4  # (slots, T, longest) + ids [B, T], valid [B] (device broadcasts)
    SCORE = 5  # (N, windows, distributions) + ids [N] (device broadcast)
    STOP = 6


class TensorParallelError(RuntimeError):
    """A rank died, hung or fell out of step: the server cannot go on."""


class ShardedBase:
    """One rank's handle on the group that shares the base. On rank 0 its methods send each base operation
    to the other ranks before rank 0 runs it (the runner calls them); `lockstep` brackets those operations
    for the watchdog. On the other ranks only `agree_on_pages` is used (by their runner's constructor)."""

    def __init__(self, group: Group, workers: list[subprocess.Popen] | None = None) -> None:
        self.group = group
        self.world_size = group.world_size
        self.workers = workers or []
        self._lock = threading.Lock()
        # When the step's latest base operation started; None between steps. The engine thread clears it after
        # the step (`step_ended`), whose host sync lies behind it; the watchdog only reads it, and never calls
        # into CUDA (a query from another thread while a memory's graphs are captured would break the
        # capture).
        self._busy_since: float | None = None
        self.failure: str | None = None

    # -- both sides ----------------------------------------------------------------------------------
    def agree_on_pages(self, num_pages: int) -> int:
        """The KV page count every rank can hold (ranks hold the same page numbers): the smallest one's."""
        t = torch.tensor([num_pages], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group.control)
        return int(t.item())

    # -- rank 0 ----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lockstep(self) -> Iterator[None]:
        """Around each base operation on rank 0: from here to the end of the step (its host sync waits for
        every rank's forward) it counts as in flight for the watchdog, and any exception in it is fatal: the
        other ranks may be waiting in a collective that rank 0 will never join, so the ranks are out of step
        for good."""
        if self.failure is not None:
            raise TensorParallelError(self.failure)
        with self._lock:
            self._busy_since = time.monotonic()
        try:
            yield
        except BaseException as exc:
            self.fail(f"base forward failed under tensor parallelism: {type(exc).__name__}: {exc}")
            raise

    def step_ended(self) -> None:
        """The engine thread finished a step (or its failure): no base work of it is in flight any more."""
        with self._lock:
            self._busy_since = None

    def fail(self, message: str) -> None:
        if self.failure is None:
            self.failure = message

    def overdue(self, timeout: float) -> str | None:
        """Why the group must stop, if it must: a worker exited, an operation failed or is late."""
        for rank, w in enumerate(self.workers, start=1):
            code = w.poll()
            if code is not None:
                return f"tensor-parallel rank {rank} (pid {w.pid}) exited with code {code}"
        if self.failure is not None:
            return self.failure
        with self._lock:
            if self._busy_since is None:
                return None
            late = time.monotonic() - self._busy_since
        if late > timeout:
            return (
                f"a base forward has not finished on every tensor-parallel rank after {late:.0f} s: "
                "a rank hangs"
            )
        return None

    def _send(self, op: Op, payload: Any = None) -> None:
        dist.broadcast_object_list([(op, payload)], src=0, group=self.group.control)

    def flush(self, kv: ModelKV) -> None:
        """Before rank 0's base cache applies its pending changes: the other ranks queue the same ones."""
        self._send(Op.FLUSH, kv.pending_updates())

    def prefill(self, inputs: Any) -> None:
        self._send(Op.PREFILL, inputs)

    def decode(self, tokens: torch.Tensor, slots: list[int], longest: int) -> None:
        self._send(Op.DECODE, (slots, longest))
        dist.broadcast(tokens, src=0)

    def verify(self, slots: list[int], ids: torch.Tensor, valid: torch.Tensor, longest: int) -> None:
        self._send(Op.VERIFY, (slots, ids.shape[1], longest))
        dist.broadcast(ids.contiguous(), src=0)
        dist.broadcast(valid.contiguous(), src=0)

    def score(self, ids: torch.Tensor, windows: list[Window], distributions: bool) -> None:
        self._send(Op.SCORE, (ids.shape[0], windows, distributions))
        dist.broadcast(ids.contiguous(), src=0)

    def stop(self, timeout: float = 10.0) -> None:
        """Tell the workers to exit (between steps: nothing else is in flight), wait, kill what is left."""
        if self.failure is None and all(w.poll() is None for w in self.workers):
            try:
                self._send(Op.STOP)
            except Exception:  # noqa: BLE001 - they are killed below
                log.exception("could not tell the tensor-parallel workers to stop")
        stop_workers(self.workers, timeout)
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


class Unsharded:
    """The base on one device: `ShardedBase`'s rank-0 calls with no other rank to tell. The runner always
    calls its base's shards, so tensor parallelism is that object's business rather than a branch at every
    forward."""

    world_size = 1

    def agree_on_pages(self, num_pages: int) -> int:
        return num_pages

    def lockstep(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()  # a failed base forward fails its step's rows, not the server

    def flush(self, kv: ModelKV) -> None:
        pass

    def step_ended(self) -> None:
        pass

    def prefill(self, inputs: Any) -> None:
        pass

    def decode(self, tokens: torch.Tensor, slots: list[int], longest: int) -> None:
        pass

    def verify(self, slots: list[int], ids: torch.Tensor, valid: torch.Tensor, longest: int) -> None:
        pass

    def score(self, ids: torch.Tensor, windows: list[Window], distributions: bool) -> None:
        pass


# -- the other ranks ----------------------------------------------------------------------------------
def serve_shard(shards: ShardedBase, runner: Any) -> None:
    """A worker's loop: run each base operation rank 0 broadcasts on this rank's share, until STOP."""
    from server.runner import prefill_forward

    base = runner.models[None]
    lm, kv, up = base.lm, base.kv, runner.upload
    device = shards.group.device
    while True:
        received: list[Any] = [None]
        dist.broadcast_object_list(received, src=0, group=shards.group.control)
        op, payload = received[0]
        if op == Op.STOP:
            return
        with torch.inference_mode():
            if op == Op.FLUSH:
                kv.queue_updates(*payload)
                kv.flush(up)
            elif op == Op.PREFILL:
                prefill_forward(lm, kv, payload, up)
            elif op == Op.DECODE:
                slots, longest = payload
                dist.broadcast(runner.tokens, src=0)
                slots_dev = up(np.asarray(slots, dtype=np.int64))
                base.graphs.run(slots_dev, len(slots), longest)
                runner.caches.mirrored_decode(slots_dev)
            elif op == Op.VERIFY:
                slots, t, longest = payload
                ids = torch.empty(len(slots), t, dtype=torch.long, device=device)
                valid = torch.empty(len(slots), dtype=torch.long, device=device)
                dist.broadcast(ids, src=0)
                dist.broadcast(valid, src=0)
                base.verify.run(up(np.asarray(slots, dtype=np.int64)), ids, valid, longest)
            elif op == Op.SCORE:
                n, windows, distributions = payload
                ids = torch.empty(n, dtype=torch.long, device=device)
                dist.broadcast(ids, src=0)
                (batch_distributions if distributions else batch_logprobs)(
                    lm.model, ids, windows, lm.vocab_size
                )
            else:
                raise TensorParallelError(f"unknown operation {op!r}")
        if device.type == "cuda":  # staging buffers are reused by the next operation's uploads
            torch.cuda.synchronize(device)
        up.reset()


def worker_main(spec: WorkerSpec) -> int:
    """`python -m server.tp SPEC`: rank `spec.rank`, started by rank 0."""
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s %(levelname)s rank{spec.rank} %(name)s: %(message)s"
    )
    die_with_parent(spec.parent)
    from memories.models import resolve_device
    from server.loader import load_base
    from server.runner import ModelRunner

    store = dist.TCPStore("127.0.0.1", spec.port, spec.world_size, is_master=False)
    group = join(spec.rank, spec.world_size, store, resolve_device(spec.model.device))
    base = load_base(spec.model, spec.engine.max_model_len, sharded=True)
    shards = ShardedBase(group)
    base.tensor_parallel = shards
    with torch.inference_mode():
        runner = ModelRunner(base, spec.engine)  # the same pages, cache layout and graphs as rank 0's
    serve_shard(shards, runner)
    log.info("stopped")
    return 0


# -- rank 0: start, load, watch, stop --------------------------------------------------------------------
class TensorParallel:
    """Rank 0's side of a tensor-parallel server: the workers, the sharded base, the watchdog."""

    def __init__(
        self,
        model: ModelConfig,
        engine: EngineConfig,
        parallel: ParallelConfig,
        on_failure: Callable[[str], None],
    ) -> None:
        """Start the workers now (call from the main thread); `on_failure(message)` runs on the watchdog's
        thread when the group fails, before the process exits."""
        self.parallel = parallel
        self.on_failure = on_failure
        self._store = open_store(parallel.tensor_parallel_size)
        self.workers = spawn_workers(self._store, model, engine, parallel)
        self.shards: ShardedBase | None = None
        self._stopping = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, name="memdec-tp-watchdog", daemon=True)
        self._watchdog.start()

    def load_base(self, model: ModelConfig, max_model_len: int | None) -> Any:
        """Join the group and load rank 0's share of the base (blocking: call off the event loop)."""
        from memories.models import resolve_device
        from server.loader import load_base

        group = join(0, self.parallel.tensor_parallel_size, self._store, resolve_device(model.device))
        base = load_base(model, max_model_len, sharded=True)
        self.shards = ShardedBase(group, self.workers)
        base.tensor_parallel = self.shards
        return base

    def _watch(self) -> None:
        while not self._stopping.wait(0.2):
            if self.shards is not None:
                reason = self.shards.overdue(self.parallel.timeout)
            else:  # still starting: only a worker's death is known
                reason = next(
                    (
                        f"tensor-parallel rank {r} exited with code {w.poll()} while starting"
                        for r, w in enumerate(self.workers, start=1)
                        if w.poll() is not None
                    ),
                    None,
                )
            if reason is not None and not self._stopping.is_set():
                self._die(reason)

    def _die(self, reason: str) -> None:
        log.critical("tensor parallelism failed: %s; the server exits", reason)
        if self.shards is not None:
            self.shards.fail(reason)
        try:
            self.on_failure(reason)
        except Exception:  # noqa: BLE001 - exiting regardless
            log.exception("failing requests after a tensor-parallel failure")
        time.sleep(FAILURE_GRACE)  # error responses and /health's 503 go out
        for w in self.workers:
            with contextlib.suppress(OSError):
                w.kill()
        logging.shutdown()
        os._exit(FAILURE_EXIT_CODE)

    def stop(self) -> None:
        """After the engine stopped (SIGTERM drained it): stop the workers and the watchdog."""
        self._stopping.set()
        if self.shards is not None:
            self.shards.stop()
        else:
            stop_workers(self.workers, 0.0)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    return worker_main(WorkerSpec.from_json(args[0]))


if __name__ == "__main__":
    sys.exit(main())
