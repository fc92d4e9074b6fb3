"""`GET /metrics`: the Prometheus exposition, open like `/health` (as in vLLM): no API key."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from server.api.state import ServingState

router = APIRouter()


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "description": "Prometheus text format 0.0.4, or OpenMetrics 1.0 when the Accept header asks "
            "for it",
            "content": {
                "text/plain": {"schema": {"type": "string"}},
                "application/openmetrics-text": {"schema": {"type": "string"}},
            },
        }
    },
    summary="Prometheus metrics (memdec_*); not behind the API key",
)
async def metrics(request: Request) -> Response:
    """The `memdec_` metrics. Served without the API key, like `/health`, so that Prometheus can scrape
    it; it holds counts and latencies, never prompts. Keep the port off the public internet, or put
    the scrape behind your proxy's auth, if memory names or traffic volume are sensitive."""
    state: ServingState = request.app.state.memdec
    body, content_type = state.metrics.render(request.headers.get("accept", ""))
    return Response(body, media_type=content_type)
