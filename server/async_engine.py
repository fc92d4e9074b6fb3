"""The engine on its own thread, with an asyncio face.

Requests, aborts, perplexity jobs and memory preparation enter through a thread-safe inbox; token
deltas go back to each caller's event loop with `call_soon_threadsafe`, where the request's
`OutputProcessor` turns them into text. The event loop never runs a model.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from server.config import EngineConfig
from server.engine import Engine, EngineObserver, StepResult
from server.errors import EngineDeadError, MemdecError, QueueFullError, ServiceUnavailableError
from server.loader import LoadedModel
from server.output import OutputProcessor
from server.registry import MemoryInfo, MemoryRegistry
from server.request import (
    EngineOutput,
    FinishReason,
    GenerationRequest,
    PerplexityRequest,
    PerplexityResult,
    RequestOutput,
)
from server.validation import request_context, validate_perplexity

log = logging.getLogger(__name__)


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class AsyncEngine:
    def __init__(
        self,
        base: LoadedModel,
        registry: MemoryRegistry,
        config: EngineConfig | None = None,
        max_queue: int = 256,
        observer: EngineObserver | None = None,
    ) -> None:
        self.engine = Engine(base, registry, config, observer)
        self.observer = observer
        self.base = base
        self.registry = registry
        self.max_queue = max_queue
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._queued = 0  # submitted, not yet taken from the inbox
        self._jobs: dict[str, concurrent.futures.Future] = {}  # perplexity jobs by request id (engine thread)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._admitting = True
        self._dead: BaseException | None = None

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="memdec-engine", daemon=True)
        self._thread.start()

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._dead is None

    @property
    def num_running(self) -> int:
        return self.engine.num_running

    @property
    def num_waiting(self) -> int:
        return self._queued + self.engine.num_waiting

    def stop_admitting(self) -> None:
        self._admitting = False

    async def drain(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while (time.monotonic() < deadline and self.is_alive
               and (self._streams or self._jobs or self.num_waiting)):
            await asyncio.sleep(0.05)

    def die(self, error: EngineDeadError) -> None:
        """From another thread, when the engine cannot go on and its thread may never return (a
        tensor-parallel rank died or hangs, and the engine thread waits in a collective): every caller gets
        `error` now."""
        self._dead = error
        with self._lock:
            streams = list(self._streams)
        for rid in streams:
            self._deliver(rid, error)
        for future in list(self._jobs.values()):
            with contextlib.suppress(concurrent.futures.InvalidStateError):
                future.set_exception(error)

    def shutdown(self) -> None:
        self._stop.set()
        self._inbox.put(("wake", None))
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _check_accepting(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        if not self._admitting or self._stop.is_set():
            raise ServiceUnavailableError("the server is shutting down and accepts no new requests")
        if self.num_waiting >= self.max_queue:
            raise QueueFullError(f"too many requests waiting ({self.max_queue}); retry later", retry_after=1)

    # -- memories ------------------------------------------------------------------------------------
    async def load_memory(self, name: str, path: str, alpha: float | None = None) -> MemoryInfo:
        """Load a memory (a worker thread) and ready it for serving (the engine thread) before it is
        visible."""
        return await asyncio.to_thread(self.registry.load, name, path, alpha, self._prepare)

    def unload_memory(self, name: str) -> None:
        self.registry.unload(name)  # frees at once when unused, else when its last request ends
        self._inbox.put(("sweep", None))

    def _prepare(self, name: str, memory: LoadedModel) -> None:
        """Capture graphs on the engine thread, between steps (a capture must not race the engine's
        kernels)."""
        if not self.is_alive:
            self.engine.prepare_memory(name, memory)
            return
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(("call", (lambda: self.engine.prepare_memory(name, memory), done)))
        done.result()

    # -- requests ------------------------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Yield the request's output deltas (with text); abort it in the engine if the consumer goes away."""
        self._check_accepting()
        self.engine.validate(request)
        processor = OutputProcessor(request, self.base.tokenizer)
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            if request.request_id in self._streams:
                raise MemdecError(f"duplicate request id {request.request_id}")
            self._streams[request.request_id] = stream
            self._queued += 1
        self._inbox.put(("add", request))
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                out = processor.process(item)
                if out is None:
                    continue
                if processor.stopped is not None:  # a stop string: the engine still runs it
                    self.abort(request.request_id, FinishReason.STOP)
                    finished = True
                yield out
                if out.finished:
                    finished = True
                    return
        finally:
            with self._lock:
                self._streams.pop(request.request_id, None)
            if not finished:
                self.abort(request.request_id)

    def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> None:
        self._inbox.put(("abort", (request_id, reason)))

    async def perplexity(self, request: PerplexityRequest) -> PerplexityResult:
        self._check_accepting()
        max_len = self.engine.max_model_len
        for name in request.memory_names:
            max_len = request_context(max_len, self.registry.get(name).max_model_len)
        validate_perplexity(request, self.base.vocab_size, max_len)
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(("perplexity", (request, future)))
        try:
            return await asyncio.wrap_future(future)
        finally:
            future.cancel()  # a client gone mid-job stops the work at its next step

    # -- the engine thread -------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain_inbox(block=not self.engine.has_unfinished())
                self._drop_abandoned_jobs()
                if self.engine.has_unfinished():
                    self._step()
                if self.observer is not None:
                    self.observer.on_queue(self.num_running, self.num_waiting)
        except BaseException as exc:  # noqa: BLE001 - anything here means the loop is gone: tell everyone
            self._dead = exc
            log.exception("engine loop died")
            self._fail_everything(EngineDeadError(exc))
        else:
            self._fail_everything(
                ServiceUnavailableError("the server shut down before this request finished")
            )

    def _step(self) -> None:
        try:
            result = self.engine.step()
        except Exception as exc:  # a bug in one step fails that step's requests, not the server
            log.exception("engine step failed")
            result = self.engine.fail_all(f"engine step failed: {type(exc).__name__}: {exc}")
        finally:
            self.engine.runner.shards.step_ended()  # for its watchdog: the step's base forwards are done
        self._dispatch(result)

    def _drain_inbox(self, block: bool) -> None:
        while True:
            try:
                kind, item = self._inbox.get(timeout=0.1) if block else self._inbox.get_nowait()
            except queue.Empty:
                return
            block = False
            if kind == "add":
                with self._lock:
                    self._queued -= 1
                self._add(item)
            elif kind == "abort":
                out = self.engine.abort_request(*item)
                if out is not None:
                    self._deliver(out.request_id, out)
            elif kind == "perplexity":
                self._add_job(*item)
            elif kind == "call":
                fn, done = item
                try:
                    done.set_result(fn())
                except Exception as exc:  # the caller (a memory load) reports it
                    done.set_exception(exc)
            elif kind == "sweep":
                self.engine.sweep_memories()

    def _add(self, request: GenerationRequest) -> None:
        try:
            self.engine.add_request(request)
        except MemdecError as exc:  # e.g. the memory was unloaded after validation
            self._deliver(request.request_id, exc)

    def _add_job(self, request: PerplexityRequest, future: concurrent.futures.Future) -> None:
        if future.cancelled():
            return
        try:
            self.engine.add_perplexity(request)
        except Exception as exc:  # noqa: BLE001 - the job's own failure goes to its caller
            future.set_exception(exc)
            return
        self._jobs[request.request_id] = future

    def _drop_abandoned_jobs(self) -> None:
        for rid in [rid for rid, f in self._jobs.items() if f.cancelled()]:
            self.engine.abort_job(rid)
            del self._jobs[rid]

    def _deliver(self, request_id: str, item: EngineOutput | BaseException) -> None:
        with self._lock:
            stream = self._streams.get(request_id)
        if stream is None:
            return
        with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody is listening
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)

    def _dispatch(self, result: StepResult) -> None:
        for out in result.outputs:
            self._deliver(out.request_id, out)
        for job in result.jobs:
            future = self._jobs.pop(job.request_id, None)
            if future is None or future.done():
                continue
            if job.error is not None:
                future.set_exception(job.error)
            else:
                future.set_result(job.result)

    def _fail_everything(self, error: MemdecError) -> None:
        """Free every sequence and job, then hand `error` itself to each waiting caller, so the API can
        answer 503 (shutdown, dead engine) rather than a generation error."""
        try:
            self.engine.fail_all(str(error))
        except Exception:  # noqa: BLE001 - best effort while dying
            log.exception("failing requests after engine death")
        with self._lock:
            streams = list(self._streams)
        for rid in streams:
            self._deliver(rid, error)
        for future in self._jobs.values():
            if not future.done():
                future.set_exception(error)
        self._jobs.clear()
