"""In-process harness for the API tests: the real app (real engine, tiny models) with its lifespan
running on an event loop in a background thread, driven by httpx through a streaming ASGI transport.

The API tests import it; the fixtures built on it are in conftest.py.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from contextlib import ExitStack
from functools import partial
from typing import Any

import httpx
from anyio.from_thread import BlockingPortal, start_blocking_portal

from server.api.app import create_app
from server.api.state import Serving, ServingState
from server.config import ServerConfig


class StreamingASGITransport(httpx.AsyncBaseTransport):
    """httpx's ASGITransport buffers the whole response; this one hands body chunks over as the app sends
    them, and tells the app `http.disconnect` when the client closes the response (or is cancelled)
    early, so in-process tests see real streaming and real disconnects. ASGI spec 2.3, like uvicorn."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.AsyncByteStream)
        scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": request.method, "headers": [(k.lower(), v) for k, v in request.headers.raw],
            "scheme": request.url.scheme, "path": request.url.path,
            "raw_path": request.url.raw_path.split(b"?")[0], "query_string": request.url.query,
            "server": (request.url.host, request.url.port or 80), "client": ("127.0.0.1", 123),
            "root_path": "",
        }
        chunks = request.stream.__aiter__()
        body_done = False
        gone = asyncio.Event()
        messages: asyncio.Queue[Any] = asyncio.Queue()

        async def receive() -> dict[str, Any]:
            nonlocal body_done
            if not body_done:
                try:
                    return {"type": "http.request", "body": await chunks.__anext__(), "more_body": True}
                except StopAsyncIteration:
                    body_done = True
                    return {"type": "http.request", "body": b"", "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            messages.put_nowait(message)

        async def run() -> None:
            try:
                await self.app(scope, receive, send)
            except Exception as exc:  # noqa: BLE001 - re-raised in the client
                messages.put_nowait(exc)
            finally:
                messages.put_nowait(None)

        task = asyncio.ensure_future(run())

        async def close() -> None:
            gone.set()
            await task

        try:
            start = await messages.get()
        except BaseException:
            await asyncio.shield(close())
            raise
        if not isinstance(start, dict):
            await close()
            raise start if isinstance(start, Exception) else RuntimeError("the app sent no response")

        class Body(httpx.AsyncByteStream):
            async def __aiter__(self):
                while True:
                    message = await messages.get()
                    if message is None:
                        return
                    if isinstance(message, Exception):
                        raise message
                    if message.get("body"):
                        yield message["body"]
                    if not message.get("more_body", False):
                        return

            async def aclose(self) -> None:
                await close()

        return httpx.Response(start["status"], headers=start.get("headers", []), stream=Body(),
                              request=request)


class InProcessServer:
    def __init__(self, config: ServerConfig, wait: bool = True) -> None:
        self.config = config
        self.app = create_app(config)
        self._wait = wait
        self._stack = ExitStack()
        self.portal: BlockingPortal
        self.client: httpx.AsyncClient

    def __enter__(self) -> InProcessServer:
        self.portal = self._stack.enter_context(start_blocking_portal())
        lifespan = self.app.router.lifespan_context(self.app)
        self._stack.enter_context(self.portal.wrap_async_context_manager(lifespan))
        self.client = self.portal.call(self._new_client)
        self._stack.callback(self.portal.call, self.client.aclose)
        if self._wait:
            self.wait_ready()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    async def _new_client(self, **headers: str) -> httpx.AsyncClient:
        transport = StreamingASGITransport(self.app)
        return httpx.AsyncClient(transport=transport, base_url="http://memdec.test", timeout=120,
                                 headers=headers)

    @property
    def state(self) -> ServingState:
        return self.app.state.memdec

    @property
    def serving(self) -> Serving:
        """The loaded server's handle (base, registry, engine); only after start-up succeeded."""
        serving = self.state.serving
        assert serving is not None, (self.state.phase, self.state.error)
        return serving

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.get("/ready").status_code == 200:
                return
            time.sleep(0.05)
        raise TimeoutError(f"server not ready: {self.state.phase} {self.state.error}")

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run an async function on the server's event loop."""
        return self.portal.call(partial(fn, *args, **kwargs))

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        return self.call(self.client.request, method, path, **kw)

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return self.request("GET", path, **kw)

    def post(self, path: str, json: Any = None, **kw: Any) -> httpx.Response:
        return self.request("POST", path, json=json, **kw)

    def delete(self, path: str, **kw: Any) -> httpx.Response:
        return self.request("DELETE", path, **kw)

    def complete(self, **body: Any) -> dict[str, Any]:
        """POST /v1/completions; asserts 200."""
        r = self.post("/v1/completions", body)
        assert r.status_code == 200, r.text
        return r.json()


def sse_events(text: str) -> list[Any]:
    """The payloads of an SSE body: parsed JSON, or the string "[DONE]"; asserts the framing."""
    assert text.endswith("\n\n"), text[-200:]
    events = []
    for block in text.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        data = block[len("data: ") :]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def assert_error(r: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    """An OpenAI-shaped error with exactly the four keys; returns its `error` object."""
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


# -- independent references: plain HF forwards over the whole sequence, mixed by the paper's formula --


def load_hf(path: Any) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def next_token_logprobs(base: Any, memory: Any | None, ids: list[int], alpha: float, vocab: int) -> Any:
    """[len(ids), vocab] float64: row t = log p(. | ids[: t + 1]) under
    alpha * p_mem + (1 - alpha) * p_base."""
    import math

    import torch

    with torch.no_grad():
        x = torch.tensor([ids])
        base_lp = torch.log_softmax(base(x).logits[0, :, :vocab].double(), -1)  # [T, V]
        if memory is None or alpha == 0.0:
            return base_lp
        mem_lp = torch.log_softmax(memory(x).logits[0, :, :vocab].double(), -1)  # [T, V]
        if alpha == 1.0:
            return mem_lp
        return torch.logaddexp(mem_lp + math.log(alpha), base_lp + math.log(1 - alpha))


def greedy_reference(base: Any, memory: Any | None, prompt: list[int], alpha: float, vocab: int, steps: int):
    """Token ids and their log-probs from greedy decoding with a full forward per step (no cache)."""
    ids = list(prompt)
    out, lps = [], []
    for _ in range(steps):
        lp = next_token_logprobs(base, memory, ids, alpha, vocab)[-1]  # [V]
        t = int(lp.argmax())
        out.append(t)
        lps.append(lp)
        ids.append(t)
    return out, lps


def ids_of(tokens: list[str]) -> list[int]:
    """Token ids from `return_tokens_as_token_ids` token names."""
    assert all(t.startswith("token_id:") for t in tokens), tokens
    return [int(t.split(":", 1)[1]) for t in tokens]
