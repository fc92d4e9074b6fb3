"""The one place where exceptions become HTTP errors: `{"error": {"message", "type", "param", "code"}}`.

MemdecError subclasses carry their own status; request-validation failures (pydantic, malformed JSON)
become 400 with `param` naming the field; routing errors keep their status; anything else is a bug,
logged with its traceback and answered with a bare 500.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from server.api.schemas import PROMPT_DOC
from server.errors import InvalidRequestError, MemdecError

log = logging.getLogger(__name__)

# Union members that pydantic inserts into error locations ("prompt", "list[int]", 0): not field names.
_UNION_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})
# For union-typed fields, pydantic reports one error per member; one sentence says what is accepted.
_EXPECTED = {
    "prompt": PROMPT_DOC,
    "input": PROMPT_DOC,
    "stop": "a string or a list of strings",
    "alpha": "a number in [0, 1] (or, for perplexity, a list of such numbers)",
}
_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
_STATUS_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def memdec_error_body(exc: MemdecError) -> dict[str, Any]:
    return error_body(exc.message, exc.error_type, exc.param, exc.code)


def _headers(exc: MemdecError) -> dict[str, str] | None:
    headers = {"Retry-After": str(int(exc.retry_after))} if exc.retry_after is not None else {}
    if exc.status_code == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return headers or None


def error_response(exc: MemdecError) -> JSONResponse:
    return JSONResponse(memdec_error_body(exc), status_code=exc.status_code, headers=_headers(exc))


def _param(loc: Sequence[Any]) -> str | None:
    path = [str(p) for p in loc[1:] if isinstance(p, str)] if loc and loc[0] == "body" else []
    names: list[str] = []
    for part in path:
        if not part.isidentifier() or part in _UNION_TAGS:
            break
        names.append(part)
    return ".".join(names) or None


def validation_error(exc: RequestValidationError) -> MemdecError:
    errors = exc.errors()
    if not errors:
        return InvalidRequestError("invalid request")
    first = errors[0]
    loc = tuple(first.get("loc", ()))
    kind = first.get("type", "")
    if kind == "json_invalid":
        where = f" at character {loc[1]}" if len(loc) > 1 else ""
        reason = (first.get("ctx") or {}).get("error", "JSON decode error")
        return InvalidRequestError(f"malformed JSON body{where}: {reason}", code="invalid_json")
    if loc == ("body",):
        if kind == "missing":
            return InvalidRequestError("a JSON object body is required", code="missing_body")
        return InvalidRequestError(
            "the request body must be a JSON object, sent with 'Content-Type: application/json'",
            code="invalid_body",
        )
    param = _param(loc)
    if kind == "missing":
        return InvalidRequestError(f"'{param}' is required", param=param, code="missing_field")
    if kind == "extra_forbidden":
        return InvalidRequestError(f"unknown field '{param}'", param=param, code="unknown_field")
    top = param.split(".")[0] if param else None
    same_field = [e for e in errors if _param(tuple(e.get("loc", ()))) == param]
    if top in _EXPECTED and len(same_field) > 1 and param == top:
        return InvalidRequestError(f"'{param}' must be {_EXPECTED[top]}", param=param)
    msg = first.get("msg", "invalid value")
    return InvalidRequestError(f"invalid '{param}': {msg}" if param else msg, param=param)


def as_memdec_error(exc: BaseException) -> MemdecError:
    """Any exception as the MemdecError a client sees (unexpected ones as a bare internal error)."""
    if isinstance(exc, MemdecError):
        return exc
    if isinstance(exc, RequestValidationError):
        return validation_error(exc)
    log.error("unexpected error", exc_info=exc)
    return MemdecError("internal server error", code="internal_error")


def _allowed_methods(request: Request) -> str:
    """Every method the path supports. Starlette's 405 names only the first route that matched the path,
    but one path may have several routes (GET and POST /v1/memories), and `Allow` must list them all."""
    allowed = []
    for method in _METHODS:
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] is Match.FULL for route in request.app.router.routes):
            allowed.append(method)
    return ", ".join(allowed)


def _http_exception(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = exc.detail if isinstance(exc.detail, str) else "request failed"
    headers = exc.headers
    if exc.status_code == 404:
        message = "no such endpoint"
    elif exc.status_code == 405:
        message = "method not allowed on this endpoint"
        headers = {**(headers or {}), "Allow": _allowed_methods(request)}
    type_ = _STATUS_TYPES.get(exc.status_code,
                              "internal_error" if exc.status_code >= 500 else "invalid_request_error")
    return JSONResponse(error_body(message, type_), status_code=exc.status_code, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    async def on_memdec(_: Request, exc: Exception) -> JSONResponse:
        return error_response(as_memdec_error(exc))

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        return _http_exception(request, exc)

    app.add_exception_handler(MemdecError, on_memdec)
    app.add_exception_handler(RequestValidationError, on_memdec)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_memdec)
