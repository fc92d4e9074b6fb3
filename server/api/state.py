"""What the API serves from: the loaded base, the memory registry and the engine, loaded in the background.

Loading runs off the event loop so that `/health` answers (and `/ready` says 503) while weights load.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.api.tokens import TokenStrings
from server.async_engine import AsyncEngine
from server.config import MemorySpec, ServerConfig
from server.errors import (
    EngineDeadError,
    InvalidRequestError,
    MemdecError,
    NotFoundError,
    ServiceUnavailableError,
)
from server.loader import LoadedModel, load_base
from server.metrics import Metrics
from server.observer import MetricsObserver
from server.registry import MemoryInfo, MemoryRegistry

log = logging.getLogger(__name__)


class RegistryFileError(ValueError):
    """The --registry file is missing or malformed."""


def read_registry_file(path: Path) -> tuple[MemorySpec, ...]:
    """A JSON list of {"name", "path", "alpha"?} (or {"memories": [...]}); relative paths are taken
    relative to the file's directory."""
    try:
        data: Any = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise RegistryFileError(f"cannot read registry file {path}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise RegistryFileError(f"registry file {path} is not valid JSON: {exc}") from exc
    if isinstance(data, dict) and isinstance(data.get("memories"), list):
        data = data["memories"]
    if not isinstance(data, list):
        raise RegistryFileError(f"registry file {path} must hold a JSON list of {{name, path, alpha?}}")
    specs = []
    for i, item in enumerate(data):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not isinstance(item.get("path"), str):
            raise RegistryFileError(f"registry file {path}, entry {i}: needs string 'name' and 'path'")
        alpha = item.get("alpha")
        if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 <= alpha <= 1):
            raise RegistryFileError(f"registry file {path}, entry {i}: 'alpha' must be a number in [0, 1]")
        mem_path = Path(item["path"])
        if not mem_path.is_absolute():
            mem_path = (Path(path).resolve().parent / mem_path).resolve()
        specs.append(MemorySpec(item["name"], str(mem_path), None if alpha is None else float(alpha)))
    return tuple(specs)


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


class ServingState:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.served_model_name = config.served_model_name or config.model.model
        self.created = int(time.time())
        self.phase = Phase.LOADING
        self.error: str | None = None
        self.base: LoadedModel | None = None
        self.registry: MemoryRegistry | None = None
        self.engine: AsyncEngine | None = None
        self.token_strings: TokenStrings | None = None
        self.metrics = Metrics()  # exists before loading, so /metrics answers (and counts loads) from the start
        self.on_failure: Callable[[str], None] | None = None  # the CLI stops the server with it
        self._task: asyncio.Task | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def start_loading(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._load(), name="memdec-load")

    async def _load(self) -> None:
        config = self.config
        try:
            specs = config.memories
            if config.registry_file is not None:
                specs = specs + read_registry_file(config.registry_file)
            base = await asyncio.to_thread(load_base, config.model, config.engine.max_model_len)
            registry = MemoryRegistry(base, on_loaded=self.metrics.memory_loaded, on_freed=self.metrics.memory_unloaded)
            for spec in specs:
                with self.counting_load():
                    await asyncio.to_thread(registry.load, spec.name, spec.path, spec.alpha)
            engine = AsyncEngine(
                base, registry, config.engine, max_queue=config.max_queue, observer=MetricsObserver(self.metrics)
            )
            engine.start()
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
        self.base, self.registry, self.engine = base, registry, engine
        self.token_strings = TokenStrings(base.tokenizer)
        if self.phase is Phase.LOADING:
            self.phase = Phase.READY
            log.info("ready: serving %s with %d memories", self.served_model_name, len(registry.list()))

    def begin_shutdown(self) -> None:
        """Refuse new work at once (503); in-flight requests go on. Safe to call from a signal handler."""
        if self.phase is not Phase.FAILED:
            self.phase = Phase.STOPPING
        if self.engine is not None:
            self.engine.stop_admitting()

    async def shutdown(self) -> None:
        self.begin_shutdown()
        if self._task is not None and not self._task.done():
            self._task.cancel()  # a load still in its thread finishes there, unused
        if self.engine is not None:
            await self.engine.drain(self.config.shutdown_timeout)
            await asyncio.to_thread(self.engine.shutdown)

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
    def ready_engine(self) -> AsyncEngine:
        if self.phase is Phase.LOADING:
            raise _loading()
        if self.phase is Phase.FAILED:
            raise ServiceUnavailableError(f"the server failed to start: {self.error}", code="startup_failed")
        if self.phase is Phase.STOPPING:
            raise ServiceUnavailableError("the server is shutting down", code="shutting_down")
        assert self.engine is not None
        if not self.engine.is_alive:
            raise EngineDeadError("the engine has stopped", code="engine_dead")
        return self.engine

    def resolve(self, model: str | None, memory: str | None, memory_given: bool) -> Target:
        """`model` names the base or a memory; an explicit `memory` (null = none) must agree with it."""
        assert self.registry is not None
        model_memory: MemoryInfo | None = None
        if model is not None and model != self.served_model_name:
            try:
                model_memory = self.registry.get(model)
            except NotFoundError:
                raise NotFoundError(
                    f"The model `{model}` does not exist.", param="model", code="model_not_found"
                ) from None
        if not memory_given:
            return Target(model or self.served_model_name, model_memory)
        if model_memory is not None and memory != model_memory.name:
            raise InvalidRequestError(
                f"`model` names memory {model_memory.name!r} but `memory` is {memory!r}; give one of them",
                param="memory",
            )
        info = self.registry.get(memory) if memory is not None else None  # NotFoundError(param="memory")
        return Target(model or self.served_model_name, info)


def _loading() -> ServiceUnavailableError:
    exc = ServiceUnavailableError("the model is still loading; retry shortly", code="model_loading")
    exc.retry_after = 5  # type: ignore[attr-defined]
    return exc
