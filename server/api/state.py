"""What the API serves from: the loaded base, the memory registry and the engine, loaded in the background.

Loading runs off the event loop so that `/health` answers (and `/ready` says 503) while weights load.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from memories.models import is_hub_id
from server.api.chat_template import model_chat_template, read_chat_template
from server.api.tokens import TokenStrings
from server.async_engine import AsyncEngine
from server.config import (
    MemorySpec,
    ServerConfig,
    default_served_name,
    read_registry_file,
    write_registry_file,
)
from server.errors import (
    EngineDeadError,
    InvalidRequestError,
    MemdecError,
    NotFoundError,
    ServiceUnavailableError,
    StartupFailedError,
)
from server.loader import LoadedModel, load_base
from server.metrics import Metrics
from server.observer import MetricsObserver
from server.registry import MemoryInfo, MemoryRegistry
from server.tp import TensorParallel
from server.validation import check_distinct, request_context

log = logging.getLogger(__name__)


def _persisted_source(path: str) -> str:
    """A memory's source as the registry file keeps it: a hub id as given, a local path made absolute."""
    from pathlib import Path

    return path if is_hub_id(path) else str(Path(path).resolve())


class Phase(str, enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    STOPPING = "stopping"


@dataclass(frozen=True)
class Target:
    """What a request runs on, resolved from `model`, `memory` and `alpha`."""

    model: str  # echoed back in responses
    memory: MemoryInfo | None
    # several memories at once (then `memory` is None); see `check_several`
    memories: tuple[MemoryInfo, ...] = ()
    # "memory": "auto" before the choice: its candidates (`server.api.auto`)
    auto: tuple[MemoryInfo, ...] | None = None

    @property
    def memory_field(self) -> str | list[str] | None:
        """The response's `memory`: the memory's name, the list of names, or null."""
        if self.memories:
            return [m.name for m in self.memories]
        return self.memory.name if self.memory else None


@dataclass(frozen=True)
class Serving:
    """What the routes serve from once start-up is done: one ready handle, nothing optional."""

    model_name: str  # the base model's name in the API
    created: int
    base: LoadedModel
    registry: MemoryRegistry
    engine: AsyncEngine
    token_strings: TokenStrings
    chat_template: str | None  # --chat-template's text, else the tokenizer's; None: chat is refused (400)

    def context_of(self, memory: MemoryInfo | None, *more: MemoryInfo) -> int:
        """The context a request on `memory` (None: the base alone), and on `more` memories, may use."""
        context = request_context(self.base.max_model_len, memory.max_model_len if memory else None)
        for info in more:
            context = request_context(context, info.max_model_len)
        return context

    def model_memory(self, model: str) -> MemoryInfo | None:
        """None when `model` names the base; the memory it names otherwise (404 when it names nothing)."""
        if model == self.model_name:
            return None
        try:
            return self.registry.get(model)
        except NotFoundError:
            raise NotFoundError(f"The model `{model}` does not exist.", param="model",
                                code="model_not_found") from None

    def resolve(self, model: str | None, memory: str | list[str] | None, memory_given: bool) -> Target:
        """`model` names the base or a memory; an explicit `memory` (null = none) must agree with it. A list
        of one memory is that memory; a list of several mixes them all (`model` must then be the base)."""
        model_memory = self.model_memory(model) if model is not None else None
        if isinstance(memory, list):
            if len(memory) == 1:
                memory = memory[0]
            else:
                if model_memory is not None:
                    raise InvalidRequestError(
                        f"`model` names memory {model_memory.name!r} but `memory` lists several; with "
                        "several memories `model` is the base (or omitted)", param="memory",
                    )
                check_distinct(memory, "memory")
                infos = tuple(self.registry.get(name) for name in memory)  # NotFoundError(param="memory")
                return Target(model or self.model_name, None, infos)
        if not memory_given:
            return Target(model or self.model_name, model_memory)
        if model_memory is not None and memory != model_memory.name:
            raise InvalidRequestError(
                f"`model` names memory {model_memory.name!r} but `memory` is {memory!r}; give one of them",
                param="memory",
            )
        info = self.registry.get(memory) if memory is not None else None  # NotFoundError(param="memory")
        return Target(model or self.model_name, info)


class ServingState:
    """The server's life cycle (loading, ready, failed, stopping) and, once ready, its `Serving` handle."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.served_model_name = config.served_model_name or default_served_name(config.model.model)
        self.created = int(time.time())
        self.phase = Phase.LOADING
        self.error: str | None = None
        self.serving: Serving | None = None  # set once loaded; routes take it from `ready()`
        # exists before loading, so /metrics answers (and counts loads) from the start
        self.metrics = Metrics()
        self.metrics.tensor_parallel_size.set(config.parallel.tensor_parallel_size)
        self.on_failure: Callable[[str], None] | None = None  # the CLI stops the server with it
        self.parallel: TensorParallel | None = None  # the other ranks, with --tensor-parallel-size > 1
        self._task: asyncio.Task | None = None
        self._persist_lock = threading.Lock()

    # -- lifecycle -------------------------------------------------------------------------------
    def start_loading(self) -> None:
        # the workers start loading their shares now, beside ours
        if self.config.parallel.tensor_parallel_size > 1:
            self.parallel = TensorParallel(self.config.model, self.config.engine, self.config.parallel,
                                           self._parallel_failed)
        self._task = asyncio.get_running_loop().create_task(self._load(), name="memdec-load")

    async def _load(self) -> None:
        try:
            serving = await self._load_serving()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure to load is reported, then the server stops
            message = getattr(exc, "message", None) or str(exc)
            self.error = f"{type(exc).__name__}: {message}"
            self.phase = Phase.FAILED
            log.error("start-up failed: %s", self.error)
            if self.on_failure is not None:
                self.on_failure(self.error)
            return
        self.serving = serving
        if self.phase is Phase.LOADING:
            self.phase = Phase.READY
            log.info("ready: serving %s with %d memories", self.served_model_name,
                     len(serving.registry.list()))

    async def _load_serving(self) -> Serving:
        config = self.config
        specs = config.memories
        if config.registry_file is not None:
            listed = read_registry_file(config.registry_file, missing_ok=config.persist_registry)
            # the file is the latest state: its entries replace flags of the same name
            if config.persist_registry:
                names = {s.name for s in listed}
                specs = tuple(s for s in specs if s.name not in names)
            specs = specs + listed
        if self.parallel is not None:
            base = await asyncio.to_thread(self.parallel.load_base, config.model, config.engine.max_model_len)
        else:
            base = await asyncio.to_thread(load_base, config.model, config.engine.max_model_len)
        registry = MemoryRegistry(base, on_loaded=self.metrics.memory_loaded,
                                  on_freed=self.metrics.memory_unloaded)
        for spec in specs:
            with self.counting_load():
                await asyncio.to_thread(registry.load, spec.name, spec.path, spec.alpha)
        engine = AsyncEngine(
            base, registry, config.engine, max_queue=config.max_queue, observer=MetricsObserver(self.metrics)
        )
        engine.start()
        template = (read_chat_template(config.chat_template) if config.chat_template
                    else model_chat_template(base.tokenizer))
        return Serving(
            self.served_model_name, self.created, base, registry, engine, TokenStrings(base.tokenizer),
            template,
        )

    def _parallel_failed(self, reason: str) -> None:
        """A tensor-parallel rank died or hangs (the watchdog's thread; the process exits right after): every
        caller gets the error and /health fails."""
        if self.serving is not None:
            self.serving.engine.die(EngineDeadError(reason))
        else:
            self.error, self.phase = reason, Phase.FAILED

    def begin_shutdown(self) -> None:
        """Refuse new work at once (503); in-flight requests go on. Safe to call from a signal handler."""
        if self.phase is not Phase.FAILED:
            self.phase = Phase.STOPPING
        if self.serving is not None:
            self.serving.engine.stop_admitting()

    async def shutdown(self) -> None:
        self.begin_shutdown()
        if self._task is not None and not self._task.done():
            self._task.cancel()  # a load still in its thread finishes there, unused
        if self.serving is not None:
            await self.serving.engine.drain(self.config.shutdown_timeout)
            await asyncio.to_thread(self.serving.engine.shutdown)
        if self.parallel is not None:  # after the engine: no step is in flight
            await asyncio.to_thread(self.parallel.stop)

    def persist_registry(self) -> None:
        """With --persist-registry, write every loaded memory (name, source, alpha) to the registry file,
        atomically (`write_registry_file`). Blocking: call off the event loop. Writes are serialised and each
        lists the registry as it is when the write starts, so the last one to finish is the latest state."""
        config = self.config
        if not config.persist_registry or config.registry_file is None or self.serving is None:
            return
        with self._persist_lock:
            specs = [MemorySpec(m.name, _persisted_source(m.path), m.alpha)
                     for m in self.serving.registry.list()]
            try:
                write_registry_file(config.registry_file, specs)
            except OSError as exc:
                raise MemdecError(
                    f"the change is live but the registry file {config.registry_file} could not be "
                    f"rewritten: {exc}",
                    code="registry_write_failed",
                ) from exc

    @contextmanager
    def counting_load(self) -> Iterator[None]:
        """Count one memory load attempt in `memdec_memory_loads_total{result}`: `success`; `invalid` when
        the input was refused (a 4xx: bad path, manifest, tokenizer, name taken); `error` otherwise."""
        try:
            yield
        except MemdecError as exc:
            self.metrics.memory_load_result("invalid" if 400 <= exc.status_code < 500 else "error")
            raise
        except Exception:
            self.metrics.memory_load_result("error")
            raise
        self.metrics.memory_load_result("success")

    # -- access for requests ----------------------------------------------------------------------
    def ready(self) -> Serving:
        """The serving handle, or the 503 that says why there is none (loading, failed, stopping, dead)."""
        if self.phase is Phase.LOADING:
            raise ServiceUnavailableError("the model is still loading; retry shortly", code="model_loading",
                                          retry_after=5)
        if self.phase is Phase.FAILED:
            raise StartupFailedError(self.error)
        if self.phase is Phase.STOPPING or self.serving is None:
            raise ServiceUnavailableError("the server is shutting down", code="shutting_down")
        if not self.serving.engine.is_alive:
            raise EngineDeadError()
        return self.serving
