"""The processes of a tensor-parallel server and their torch.distributed groups.

`memdec serve --tensor-parallel-size N` is rank 0; it starts ranks 1..N-1 itself (`spawn_workers`), as
`python -m server.tp` children, one per GPU (`cuda:<rank>`) or, on a machine without GPUs, one per CPU
process. They meet through a TCPStore that rank 0 opens on a free port before they start (no port race),
then form two groups:

- the default group (NCCL on GPUs, gloo on CPU): the base's own collectives, issued by transformers'
  tensor-parallel layers inside every forward (and inside the captured decode graphs on NCCL);
- a gloo control group on which rank 0 broadcasts each step's descriptor (`server/tp.py`). Workers wait
  on it while the server idles, so its timeout is long; a rank that dies or hangs is caught by rank 0's
  watchdog (`server/tp.py`), not by collective timeouts.

A worker never outlives rank 0: it asks the kernel for SIGKILL when its parent dies (Linux
`PR_SET_PDEATHSIG`), and checks its parent once a second as well (any platform, and the race before
the prctl). Rank 0 stops them on shutdown and kills what is left.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from server.config import EngineConfig, ModelConfig, ParallelConfig

log = logging.getLogger(__name__)

HOST = "127.0.0.1"  # one node: every rank runs on this machine
# Loading a large base sharded takes minutes per rank, with skew between ranks; collectives at start-up
# (and the base's own, whose hangs the watchdog bounds instead) wait this long, as transformers' own TP does.
COLLECTIVE_TIMEOUT = timedelta(hours=2)
CONTROL_TIMEOUT = timedelta(days=365)  # workers wait here while the server has nothing to do


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to know, passed as JSON on its command line."""

    rank: int
    world_size: int
    port: int  # rank 0's TCPStore
    parent: int  # rank 0's pid
    model: ModelConfig
    engine: EngineConfig
    parallel: ParallelConfig

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkerSpec:
        data: dict[str, Any] = json.loads(text)
        return cls(
            data["rank"], data["world_size"], data["port"], data["parent"],
            ModelConfig(**data["model"]), EngineConfig(**data["engine"]), ParallelConfig(**data["parallel"]),
        )


@dataclass(frozen=True)
class Group:
    """This process's place among the ranks."""

    rank: int
    world_size: int
    device: torch.device
    control: dist.ProcessGroup  # gloo: step descriptors (host objects)


def check_devices(model: ModelConfig, parallel: ParallelConfig) -> str | None:
    """What keeps this machine from running `parallel`, if anything (checked before anything starts)."""
    n = parallel.tensor_parallel_size
    if n == 1:
        return None
    if not dist.is_available():
        return "--tensor-parallel-size needs a torch build with torch.distributed"
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if model.device not in ("auto", "cuda", "cpu"):
        return (f"--tensor-parallel-size {n} places rank r on cuda:r: use --device auto, cuda or cpu, "
                f"not {model.device}")
    if gpus and model.device == "cpu":
        # transformers' sharded loading binds each rank to the machine's accelerator.
        return (f"--tensor-parallel-size {n} on CPU processes is for machines without GPUs "
                f"(this one has {gpus})")
    if gpus and n > gpus:
        return f"--tensor-parallel-size {n} needs {n} GPUs, this machine has {gpus}"
    if model.device == "cuda" and not gpus:
        return "--device cuda: no GPU found"
    return None


def open_store(world_size: int) -> dist.TCPStore:
    """Rank 0's rendezvous, on a port the OS picks (workers learn it from their command line)."""
    return dist.TCPStore(HOST, 0, world_size, is_master=True, timeout=COLLECTIVE_TIMEOUT,
                         wait_for_workers=False)


def spawn_workers(store: dist.TCPStore, model: ModelConfig, engine: EngineConfig,
                  parallel: ParallelConfig) -> list[subprocess.Popen]:
    """Start ranks 1..N-1 (`python -m server.tp SPEC`). Call from the main thread: a child's parent-death
    signal follows the thread that started it."""
    workers = []
    for rank in range(1, parallel.tensor_parallel_size):
        spec = WorkerSpec(rank, parallel.tensor_parallel_size, store.port, os.getpid(), model, engine,
                          parallel)
        env = {**os.environ, **rank_env(rank, parallel.tensor_parallel_size)}
        workers.append(subprocess.Popen([sys.executable, "-m", "server.tp", spec.to_json()], env=env))
    log.info("started %d tensor-parallel workers: pids %s", len(workers), [w.pid for w in workers])
    return workers


def rank_env(rank: int, world_size: int) -> dict[str, str]:
    """torchrun's variables: transformers' tensor-parallel loading reads them to pick the rank's device."""
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size)}


def join(rank: int, world_size: int, store: dist.Store, device: torch.device) -> Group:
    """Initialise torch.distributed for this rank (NCCL on GPUs, gloo on CPU) and the gloo control group."""
    os.environ.update(rank_env(rank, world_size))
    if device.type == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            timeout=COLLECTIVE_TIMEOUT, device_id=device if backend == "nccl" else None)
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    log.info("rank %d of %d joined (%s on %s)", rank, world_size, backend, device)
    return Group(rank, world_size, device, control)


def die_with_parent(parent: int) -> None:
    """This worker is killed when rank 0 dies, however it dies (SIGKILL included): never an orphan."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG

    def watch() -> None:
        while True:
            if os.getppid() != parent:  # reparented: rank 0 is gone (also covers its death before the prctl)
                os._exit(1)
            time.sleep(1.0)

    threading.Thread(target=watch, name="memdec-tp-parent", daemon=True).start()


def stop_workers(workers: list[subprocess.Popen], timeout: float) -> None:
    """Wait up to `timeout` for workers that were told to stop, then kill the rest."""
    deadline = time.monotonic() + timeout
    for w in workers:
        with contextlib.suppress(subprocess.TimeoutExpired):
            w.wait(max(0.0, deadline - time.monotonic()))
    for w in workers:
        if w.poll() is None:
            log.warning("tensor-parallel worker %d did not stop: killing it", w.pid)
            w.kill()
            w.wait()
