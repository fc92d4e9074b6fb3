"""Engine streams for one HTTP request: start them all, merge their outputs, stop them on disconnect.

A request with several prompts or n > 1 is several engine requests. They are started together (so the
engine batches them) and each is pulled to its first output before the HTTP response begins, so a
refused one (bad input, unknown memory, full queue) becomes a plain 4xx/429 with nothing left running.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from server.errors import MemdecError
from server.request import GenerationRequest, RequestOutput

T = TypeVar("T")
DONE_FRAME = b"data: [DONE]\n\n"
_END = object()


def sse_frame(payload: dict[str, Any]) -> bytes:
    return (b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
            + b"\n\n")


@dataclass
class EngineStream:
    iterator: AsyncIterator[RequestOutput]
    first: RequestOutput


async def _aclose(iterator: AsyncIterable[Any]) -> None:
    close = getattr(iterator, "aclose", None)
    if close is not None:
        with contextlib.suppress(Exception):
            await close()


async def _open_one(generate: Callable[[GenerationRequest], Any], request: GenerationRequest) -> EngineStream:
    iterator = generate(request)
    if inspect.isawaitable(iterator):
        iterator = await iterator
    try:
        first = await anext(iterator)
    except BaseException:
        await _aclose(iterator)
        raise
    return EngineStream(iterator, first)


async def open_streams(
    generate: Callable[[GenerationRequest], Any], requests: list[GenerationRequest]
) -> list[EngineStream]:
    """Start all requests; on the first refusal abort the others and raise it."""
    tasks = [asyncio.ensure_future(_open_one(generate, r)) for r in requests]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    except BaseException:
        await _cancel_opened(tasks)
        raise
    failed = next((t for t in tasks if t.done() and not t.cancelled() and t.exception() is not None), None)
    if failed is not None:
        error = failed.exception()
        await _cancel_opened(tasks)
        assert error is not None
        raise error
    return [t.result() for t in tasks]


async def _cancel_opened(tasks: Sequence[asyncio.Future[EngineStream]]) -> None:
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for t in tasks:
        if t.done() and not t.cancelled() and t.exception() is None:
            await _aclose(t.result().iterator)


async def merge(streams: list[EngineStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(stream index, output) in arrival order until every stream finished; raises an engine error.

    Leaving early (an error, or the consumer closing or being cancelled) aborts the unfinished requests.
    """
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(i: int, iterator: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in iterator:
                queue.put_nowait((i, out))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((i, exc))
        queue.put_nowait((i, _END))

    pending = {i for i, s in enumerate(streams) if not s.first.finished}
    tasks = [asyncio.ensure_future(pump(i, s.iterator)) for i, s in enumerate(streams) if i in pending]
    try:
        for i, s in enumerate(streams):
            yield i, s.first
        while pending:
            i, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            if item is _END:
                if i in pending:
                    raise MemdecError("the engine ended a request without finishing it", code="engine_error")
                continue
            if item.finished:
                pending.discard(i)
            yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for s in streams:
            await _aclose(s.iterator)


class ClientDisconnected(Exception):
    """The client went away before the answer was ready; its work was cancelled."""


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (which aborts its engine requests) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
    if not task.done() or task.cancelled():
        await asyncio.gather(task, return_exceptions=True)
        raise ClientDisconnected()
    return task.result()


class EngineStreamingResponse(StreamingResponse):
    """An SSE response that aborts its engine requests however it ends, even if its body never started
    (a client gone before the first byte leaves the body generator unstarted, so its own cleanup never
    runs)."""

    def __init__(self, content: AsyncIterator[bytes], streams: list[EngineStream], **kw: Any) -> None:
        super().__init__(content, media_type="text/event-stream", **kw)
        self._streams = streams

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await _aclose(self.body_iterator)
            for s in self._streams:
                await _aclose(s.iterator)
