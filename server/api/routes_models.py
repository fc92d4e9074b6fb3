"""`/v1/models` (model cards) and `/v1/memories` (list, hot-load, unload)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends, Request

from server.api.auth import check_admin_key, check_api_key
from server.api.paths import check_lookup, confine
from server.api.schemas import MemoryDeleted, MemoryLoadBody, ModelCard, ModelList
from server.api.state import Serving, ServingState
from server.errors import ConflictError
from server.registry import MemoryInfo

router = APIRouter()


def _serving(request: Request) -> Serving:
    state: ServingState = request.app.state.memdec
    return state.ready()


def base_card(serving: Serving) -> dict[str, Any]:
    return ModelCard(
        id=serving.model_name,
        created=serving.created,
        root=serving.base.name_or_path,
        max_model_len=serving.context_of(None),
        format=serving.base.weights_format,
        quantization=serving.base.quantization,
        serving_quantization=serving.base.serving_quantization,
    ).model_dump()


def memory_card(serving: Serving, info: MemoryInfo) -> dict[str, Any]:
    return ModelCard(
        id=info.name,
        created=info.created,
        root=info.path,
        parent=serving.model_name,
        max_model_len=serving.context_of(info),
        alpha=info.alpha,
        domain=info.domain,
        description=info.description,
        temperature=info.temperature,
        tokenizer_verified=info.tokenizer_verified,
        router=info.router,
        format=info.weights_format,
        quantization=info.quantization,
        serving_quantization=info.serving_quantization,
    ).model_dump()


@router.get("/v1/models", response_model=ModelList, dependencies=[Depends(check_api_key)])
async def list_models(request: Request) -> dict[str, Any]:
    """The base model and every loaded memory (`parent` = the base) as OpenAI model cards."""
    serving = _serving(request)
    cards = [base_card(serving)] + [memory_card(serving, m) for m in serving.registry.list()]
    return {"object": "list", "data": cards}


@router.get("/v1/models/{model_id:path}", response_model=ModelCard, dependencies=[Depends(check_api_key)])
async def retrieve_model(model_id: str, request: Request) -> dict[str, Any]:
    """One model card: the base or a memory (ids may contain '/', as hub ids do)."""
    serving = _serving(request)
    memory = serving.model_memory(model_id)
    return base_card(serving) if memory is None else memory_card(serving, memory)


@router.get("/v1/memories", response_model=ModelList, dependencies=[Depends(check_api_key)])
async def list_memories(request: Request) -> dict[str, Any]:
    """The loaded memories as model cards."""
    serving = _serving(request)
    return {"object": "list", "data": [memory_card(serving, m) for m in serving.registry.list()]}


@router.post("/v1/memories", response_model=ModelCard, dependencies=[Depends(check_admin_key)])
async def load_memory(body: MemoryLoadBody, request: Request) -> dict[str, Any]:
    """Load a memory under `name`: a directory (under --memory-root when set) or a hub id (with
    --allow-hub-memories when a root is set) holding a HF causal LM with safetensors weights, with or without
    a memdec.json manifest; it must use exactly the base model's tokenizer. Needs the admin key."""
    state: ServingState = request.app.state.memdec
    serving = state.ready()
    with state.counting_load():
        path = confine(body.path, state.config.memory_root, state.config.allow_hub_memories)
        check_lookup(path)
        if body.name == serving.model_name:
            raise ConflictError(f"{body.name!r} is the base model's name", param="name", code="name_taken")
        # The engine captures its graphs before the memory becomes visible.
        info = await serving.engine.load_memory(body.name, path, body.alpha)
    await asyncio.to_thread(state.persist_registry)
    return memory_card(serving, info)


@router.delete("/v1/memories/{name}", response_model=MemoryDeleted, dependencies=[Depends(check_admin_key)])
async def unload_memory(name: str, request: Request) -> dict[str, Any]:
    """Unload a memory: refused to new requests at once, freed when its running requests finish."""
    state: ServingState = request.app.state.memdec
    state.ready().engine.unload_memory(name)
    await asyncio.to_thread(state.persist_registry)
    return {"id": name, "object": "memory", "deleted": True}
