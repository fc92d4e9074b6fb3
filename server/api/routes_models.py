"""`/v1/models` (model cards) and `/v1/memories` (list, hot-load, unload)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from server.api.auth import check_admin_key, check_api_key
from server.api.paths import check_lookup, confine
from server.api.schemas import MemoryDeleted, MemoryLoadBody, ModelCard, ModelList
from server.api.state import ServingState
from server.errors import ConflictError, NotFoundError
from server.registry import MemoryInfo

router = APIRouter()


def _state(request: Request) -> ServingState:
    state: ServingState = request.app.state.memdec
    state.ready_engine()
    return state


def base_card(state: ServingState) -> dict[str, Any]:
    assert state.base is not None
    return ModelCard(
        id=state.served_model_name,
        created=state.created,
        root=state.base.name_or_path,
        max_model_len=state.base.max_model_len,
    ).model_dump()


def memory_card(state: ServingState, info: MemoryInfo) -> dict[str, Any]:
    assert state.base is not None
    return ModelCard(
        id=info.name,
        created=info.created,
        root=info.path,
        parent=state.served_model_name,
        max_model_len=min(info.max_model_len, state.base.max_model_len),
        alpha=info.alpha,
        domain=info.domain,
        description=info.description,
    ).model_dump()


@router.get("/v1/models", response_model=ModelList, dependencies=[Depends(check_api_key)])
async def list_models(request: Request) -> dict[str, Any]:
    """The base model and every loaded memory (`parent` = the base) as OpenAI model cards."""
    state = _state(request)
    assert state.registry is not None
    cards = [base_card(state)] + [memory_card(state, m) for m in state.registry.list()]
    return {"object": "list", "data": cards}


@router.get("/v1/models/{model_id:path}", response_model=ModelCard, dependencies=[Depends(check_api_key)])
async def retrieve_model(model_id: str, request: Request) -> dict[str, Any]:
    """One model card: the base or a memory (ids may contain '/', as hub ids do)."""
    state = _state(request)
    assert state.registry is not None
    if model_id == state.served_model_name:
        return base_card(state)
    try:
        return memory_card(state, state.registry.get(model_id))
    except NotFoundError:
        raise NotFoundError(f"The model `{model_id}` does not exist.", param="model", code="model_not_found") from None


@router.get("/v1/memories", response_model=ModelList, dependencies=[Depends(check_api_key)])
async def list_memories(request: Request) -> dict[str, Any]:
    """The loaded memories as model cards."""
    state = _state(request)
    assert state.registry is not None
    return {"object": "list", "data": [memory_card(state, m) for m in state.registry.list()]}


@router.post("/v1/memories", response_model=ModelCard, dependencies=[Depends(check_admin_key)])
async def load_memory(body: MemoryLoadBody, request: Request) -> dict[str, Any]:
    """Load a memory directory (a HF causal LM with a memdec.json manifest, safetensors weights only)
    under `name`; it must use exactly the base model's tokenizer. Needs the admin key."""
    state = _state(request)
    assert state.registry is not None
    with state.counting_load():
        path = confine(body.path, state.config.memory_root)
        check_lookup(path)
        if body.name == state.served_model_name:
            raise ConflictError(f"{body.name!r} is the base model's name", param="name", code="name_taken")
        # The engine captures its graphs before the memory becomes visible.
        info = await state.ready_engine().load_memory(body.name, path, body.alpha)
    return memory_card(state, info)


@router.delete("/v1/memories/{name}", response_model=MemoryDeleted, dependencies=[Depends(check_admin_key)])
async def unload_memory(name: str, request: Request) -> dict[str, Any]:
    """Unload a memory: refused to new requests at once, freed when its running requests finish."""
    state = _state(request)
    state.ready_engine().unload_memory(name)
    return {"id": name, "object": "memory", "deleted": True}
