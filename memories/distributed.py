"""The torch.distributed world the toolkit's stages run in when `torchrun` launches them.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK (and the rendezvous address) in every worker; `session()`
reads them and initialises the process group: gloo on CPU; NCCL on GPU (each rank on cuda:LOCAL_RANK)
with a gloo group beside it for the barriers and small Python objects the stages exchange.

Invariants:
- Without torchrun's environment (WORLD_SIZE unset or 1) nothing is initialised and every helper acts as
  in one process: rank 0 of 1, `barrier` returns at once, `broadcast` returns its argument, so the stages
  run exactly as they did before torch.distributed existed in them.
- Work is divided by `assigned(num_shards)`: shard i belongs to rank i mod world size. That rule depends on
  nothing but (i, rank, size), so every rank knows every other rank's shards without talking, and a re-run
  at another world size simply deals the unfinished shards out again.
- Every collective the stages make goes through this module, which turns a peer's disappearance into one
  DistributedError naming this rank and what it was waiting for; torchrun's own summary names the rank
  that died first.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

# A stage may keep the other ranks waiting at a barrier for a long time (rank 0 trains the IVF-PQ index,
# merges shards, writes the model); torchrun ends them at once when a rank dies, so a long timeout only
# bounds a true hang.
TIMEOUT_ENV = "MEMDEC_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 4 * 3600
# Fault injection for the tests (and for rehearsing a failure on a real cluster): "<stage>:<rank>:<units>"
# makes that rank SIGKILL itself once it has finished <units> shards of <stage>, as an OOM killer or a
# lost node would, with no chance to clean up.
KILL_ENV = "MEMDEC_KILL_AT"


class DistributedError(RuntimeError):
    """The ranks of a torchrun launch cannot go on together: a peer stopped, or the launch is unsupported."""


class LostPeers(DistributedError):
    """A collective failed because another rank stopped (exited, crashed or was killed)."""


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def __str__(self) -> str:
        return f"rank {self.rank} of {self.size}"

    def assigned(self, num_shards: int) -> list[int]:
        """The shards this rank works on: i ≡ rank (mod size)."""
        return list(range(self.rank, num_shards, self.size))


SINGLE = World()
_cpu_group: Any = None  # the gloo group for barriers and objects (None: the default group is gloo)


def launched() -> World:
    """The world torchrun's environment describes (one process when it describes none)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return SINGLE
    return World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))


def world() -> World:
    """The world of the initialised process group; one process when there is none."""
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def _timeout() -> timedelta:
    return timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))


@contextmanager
def session() -> Iterator[World]:
    """Join torchrun's process group for the duration of a command (nothing to join in one process)."""
    global _cpu_group
    env = launched()
    if not env.distributed or dist.is_initialized():
        yield world()
        return
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        # torch.device("cuda") and .to("cuda") then mean this rank's GPU.
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    dist.init_process_group("nccl" if on_gpu else "gloo", timeout=_timeout())
    _cpu_group = dist.new_group(backend="gloo", timeout=_timeout()) if on_gpu else None
    try:
        yield world()
    finally:
        _cpu_group = None
        dist.destroy_process_group()


def _collective(what: str, fn: Callable[[], T]) -> T:
    try:
        return fn()
    except RuntimeError as exc:  # gloo/NCCL report a vanished peer as RuntimeError (DistBackendError)
        raise lost_peers(what, exc) from exc


def lost_peers(what: str, exc: BaseException) -> LostPeers:
    return LostPeers(
        f"{world()}: the other ranks went away while {what} (one of them failed or was killed; "
        f"torchrun's summary names it): {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    )


def barrier(what: str) -> None:
    """Wait until every rank gets here; `what` names the wait in the error if a rank never does."""
    if world().distributed:
        _collective(what, lambda: dist.barrier(group=_cpu_group))


def broadcast(obj: T, what: str) -> T:
    """Rank 0's `obj` on every rank (picklable objects)."""
    if not world().distributed:
        return obj
    box = [obj]
    _collective(what, lambda: dist.broadcast_object_list(box, src=0, group=_cpu_group))
    return box[0]


def all_sum(values: torch.Tensor, what: str) -> torch.Tensor:
    """Element-wise sum over ranks of a small tensor (on the default group's device)."""
    if not world().distributed:
        return values
    _collective(what, lambda: dist.all_reduce(values, op=dist.ReduceOp.SUM))
    return values


# Long enough for torchrun's monitor (every 0.1 s by default) to see the rank that died.
LINGER_S = 30.0


def linger() -> None:
    """After LostPeers, wait for torchrun to stop this rank: its summary's root cause is then the rank that
    failed first, not this one, which only noticed (a rank that exits on its own first can be blamed)."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        time.sleep(LINGER_S)


def fault_point(stage: str, units_done: int) -> None:
    """SIGKILL this rank here when MEMDEC_KILL_AT asks for it (see KILL_ENV)."""
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return
    at_stage, at_rank, at_units = spec.split(":")
    if at_stage == stage and int(at_rank) == world().rank and int(at_units) == units_done:
        os.kill(os.getpid(), signal.SIGKILL)


def require_one_process(command: str) -> None:
    """Refuse a command that has no distributed form when torchrun launched several processes."""
    env = launched()
    if env.distributed:
        raise DistributedError(
            f"memdec memory {command} runs in one process; launch it without torchrun "
            f"(torchrun started {env.size}; datastore, targets, train and build run across processes)"
        )
