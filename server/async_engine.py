"""The engine on its own thread, with an asyncio face.

Requests, aborts and perplexity jobs enter through a thread-safe inbox; outputs go back to each
caller's event loop with `call_soon_threadsafe`. The event loop never runs a model.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

from server.config import EngineConfig
from server.engine import Engine, EngineObserver
from server.errors import EngineDeadError, MemdecError, QueueFullError, ServiceUnavailableError
from server.loader import LoadedModel
from server.perplexity import resolve_windows, run_perplexity, validate
from server.registry import MemoryRegistry
from server.request import GenerationRequest, PerplexityRequest, PerplexityResult, RequestOutput

log = logging.getLogger(__name__)


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


@dataclass
class _PerplexityJob:
    request: PerplexityRequest
    future: concurrent.futures.Future
    steps: Iterator[PerplexityResult | None] | None = None
    memory_name: str | None = None


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
        self._jobs: deque[_PerplexityJob] = deque()
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
        while time.monotonic() < deadline and self.is_alive and (self._streams or self._jobs or self.num_waiting):
            await asyncio.sleep(0.05)

    def shutdown(self) -> None:
        self._stop.set()
        self._inbox.put(("wake", None))
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _check_accepting(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"the engine has stopped: {self._dead}")
        if not self._admitting or self._stop.is_set():
            raise ServiceUnavailableError("the server is shutting down and accepts no new requests")
        if self.num_waiting >= self.max_queue:
            raise QueueFullError(f"too many requests waiting ({self.max_queue}); retry later", retry_after=1)

    # -- requests ------------------------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Yield the request's output deltas; abort it in the engine if the consumer goes away."""
        self._check_accepting()
        self.engine.validate(request)
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
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            with self._lock:
                self._streams.pop(request.request_id, None)
            if not finished:
                self.abort(request.request_id)

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    async def perplexity(self, request: PerplexityRequest) -> PerplexityResult:
        self._check_accepting()
        validate(request, self.base.vocab_size)
        max_len = self.engine.max_model_len
        if request.memory is not None:
            max_len = min(max_len, self.registry.get(request.memory).max_model_len)
        resolve_windows(request, max_len)
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(("perplexity", _PerplexityJob(request, future)))
        try:
            return await asyncio.wrap_future(future)
        finally:
            future.cancel()  # a client gone mid-job stops the work at the next window

    # -- the engine thread -------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain_inbox(block=not (self.engine.has_unfinished() or self._jobs))
                if self.engine.has_unfinished():
                    self._step()
                if self._jobs:
                    self._advance_job()
                if self.observer is not None:
                    self.observer.on_queue(self.num_running, self.num_waiting)
        except BaseException as exc:  # noqa: BLE001 - anything here means the loop is gone: tell everyone
            self._dead = exc
            log.exception("engine loop died")
            self._fail_everything(EngineDeadError(f"the engine has stopped: {type(exc).__name__}: {exc}"))
        else:
            self._fail_everything(ServiceUnavailableError("the server shut down before this request finished"))

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:  # a bug in one step fails that step's requests, not the server
            log.exception("engine step failed")
            outputs = self.engine.fail_all(f"engine step failed: {type(exc).__name__}: {exc}")
        self._dispatch(outputs)

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
                out = self.engine.abort_request(item)
                if out is not None:
                    self._dispatch([out])
            elif kind == "perplexity":
                self._jobs.append(item)

    def _add(self, request: GenerationRequest) -> None:
        try:
            self.engine.add_request(request)
        except MemdecError as exc:  # e.g. the memory was unloaded after validation
            self._deliver(request.request_id, exc)

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        with self._lock:
            stream = self._streams.get(request_id)
        if stream is None:
            return
        with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody is listening
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            self._deliver(out.request_id, out)

    def _advance_job(self) -> None:
        job = self._jobs[0]
        try:
            if job.future.cancelled():
                self._finish_job(job)
                return
            if job.steps is None:
                memory = None
                if job.request.memory is not None:
                    memory = self.registry.acquire(job.request.memory)
                    job.memory_name = job.request.memory
                max_len = min(self.engine.max_model_len, memory.max_model_len if memory else self.engine.max_model_len)
                context, stride = resolve_windows(job.request, max_len)
                job.steps = run_perplexity(job.request, self.base, memory, context, stride)
            result = next(job.steps)
            if result is not None:
                job.future.set_result(result)
                self._finish_job(job)
        except Exception as exc:  # the job's own failure: the engine goes on
            if not job.future.done():
                job.future.set_exception(exc)
            self._finish_job(job)

    def _finish_job(self, job: _PerplexityJob) -> None:
        self._jobs.popleft()
        job.steps = None
        if job.memory_name is not None:
            self.registry.release(job.memory_name)
            job.memory_name = None

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
        while self._jobs:
            job = self._jobs[0]
            if not job.future.done():
                job.future.set_exception(error)
            self._finish_job(job)
