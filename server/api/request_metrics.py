"""Count every `/v1/*` request in `memdec_requests_total{endpoint, status, finish_reason}`.

A pure ASGI middleware, so that streamed answers are counted too: a request is counted once, when its
final body chunk is sent (before the client can see the end, so a scrape right after an answer already
includes it), or when the app gives up on it (client gone, unhandled error). Handlers leave the finish
reason of what they generated in the request state with `set_finish_reason`; a streamed response may set
it from inside its body iterator, which runs before the final chunk.

Probes and scrapes (`/health`, `/ready`, `/metrics`, `/openapi.json`, `/docs`) are not counted: at a
scrape every few seconds they would drown the `other` endpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.metrics import Metrics

log = logging.getLogger(__name__)

_KEY = "memdec_finish_reason"
CLIENT_CLOSED = 499  # nginx's code for a client that left before the answer began
# The least complete outcome among a request's choices names the request (n > 1, several prompts).
_SEVERITY = {"stop": 0, "length": 1, "abort": 2, "error": 3}


def set_finish_reason(request: Request, reason: str | None) -> None:
    """Record the finish reason of the request being answered (None: nothing was generated)."""
    request.state.memdec_finish_reason = reason


def summarize(reasons: Iterable[str | None]) -> str | None:
    """One finish reason for a request with several choices: the least complete one (error > abort >
    length > stop); None when no choice finished."""
    known = [r for r in reasons if r is not None]
    return max(known, key=lambda r: _SEVERITY.get(r, len(_SEVERITY))) if known else None


class RequestMetrics:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope.get("path", "").startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        status: int | None = None
        counted = False

        def count(status_code: int, finish_reason: str | None) -> None:
            nonlocal counted
            if counted:
                return
            counted = True
            try:
                self.metrics.request_done(scope["path"], status_code, finish_reason)
            except Exception:  # noqa: BLE001 - a metrics failure must never fail the request
                log.exception("counting a request failed")

        async def counting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                count(status or 500, state.get(_KEY))
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except Exception:
            if status is None:  # nothing sent: the outermost error handler answers 500
                count(500, "error")
            else:  # cut off mid-body, e.g. the client left (ClientDisconnect)
                count(status, "abort")
            raise
        except BaseException:  # cancelled: the connection or the server is going away
            count(status if status is not None else CLIENT_CLOSED, "abort")
            raise
        if not counted:  # the body never ended: the client went away (or never got a start)
            count(status if status is not None else CLIENT_CLOSED, "abort")
