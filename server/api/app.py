"""The FastAPI application: routes, the one error mapping, the body-size limit, request counting,
background loading."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from server import __version__
from server.api import (
    routes_chat,
    routes_completions,
    routes_health,
    routes_lens,
    routes_metrics,
    routes_models,
    routes_perplexity,
    routes_tokenizer,
)
from server.api.body_limit import BodySizeLimit
from server.api.errors import install_error_handlers
from server.api.request_metrics import RequestMetrics
from server.api.schemas import ErrorResponse
from server.api.state import ServingState
from server.config import ServerConfig

_ERROR_STATUSES = {
    400: "Invalid request (bad value, malformed JSON, context length exceeded)",
    401: "Missing or invalid API key",
    403: "Admin endpoint disabled, admin key required, or path outside --memory-root",
    404: "Unknown model, memory or endpoint",
    409: "A memory with that name is already loaded",
    413: "Request body too large",
    429: "Waiting queue full; retry after `Retry-After` seconds",
    503: "Loading, shutting down, or the engine stopped",
}


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, minus the 422 responses it assumes: validation errors here are 400s."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description,
                             routes=app.routes)
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema


def create_app(config: ServerConfig) -> FastAPI:
    state = ServingState(config)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.start_loading()
        try:
            yield
        finally:
            await state.shutdown()

    app = FastAPI(
        title="memdec",
        version=__version__,
        description="A Hugging Face causal LM served with plug-and-play domain memories (Memory Decoder), "
        "behind an OpenAI-compatible API.",
        lifespan=lifespan,
        responses={status: {"model": ErrorResponse, "description": text}
                   for status, text in _ERROR_STATUSES.items()},
    )
    app.state.memdec = state
    install_error_handlers(app)
    routers = (routes_health, routes_metrics, routes_models, routes_completions, routes_chat,
               routes_perplexity, routes_tokenizer, routes_lens)
    for module in routers:
        app.include_router(module.router)
    app.add_middleware(BodySizeLimit, max_bytes=config.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=state.metrics)  # added last = outermost: 413s are counted too
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app
