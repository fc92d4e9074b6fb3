"""`/health` (process and engine loop alive) and `/ready` (models loaded, accepting requests)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from server.api.schemas import HealthStatus
from server.api.state import Phase, ServingState
from server.errors import EngineDeadError, StartupFailedError

router = APIRouter()


@router.get("/health", response_model=HealthStatus)
async def health(request: Request) -> dict[str, Any]:
    """200 while the process and the engine loop live (also while loading); 503 once either failed."""
    state: ServingState = request.app.state.memdec
    if state.phase is Phase.FAILED:
        raise StartupFailedError(state.error)
    if state.serving is None:
        return {"status": state.phase.value}
    engine = state.serving.engine
    if not engine.is_alive and state.phase is not Phase.STOPPING:
        raise EngineDeadError()
    return {"status": state.phase.value, "running": engine.num_running, "waiting": engine.num_waiting}


@router.get("/ready", response_model=HealthStatus)
async def ready(request: Request) -> dict[str, Any]:
    """200 once the base and the start-up memories are loaded and the engine runs; 503 before and while
    stopping."""
    state: ServingState = request.app.state.memdec
    engine = state.ready().engine
    return {"status": "ready", "running": engine.num_running, "waiting": engine.num_waiting}
