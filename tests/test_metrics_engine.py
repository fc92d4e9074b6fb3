"""Engine events reach the Prometheus metrics with the right labels and counts."""

from __future__ import annotations

import asyncio

from memories.mixing import Mixture
from server.async_engine import AsyncEngine
from server.config import EngineConfig, ModelConfig
from server.loader import load_base
from server.metrics import Metrics
from server.observer import MetricsObserver
from server.registry import MemoryRegistry
from server.request import GenerationRequest, SamplingParams


def sample(metrics: Metrics, name: str, **labels) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_requests_move_latency_token_and_step_metrics(zoo):
    metrics = Metrics()
    base = load_base(ModelConfig(str(zoo.base)))
    registry = MemoryRegistry(base)
    registry.on_loaded = metrics.memory_loaded
    registry.load("med", str(zoo.mem_llama))
    engine = AsyncEngine(base, registry, EngineConfig(), observer=MetricsObserver(metrics))
    engine.start()
    try:
        async def main():
            reqs = [
                GenerationRequest("a", (5, 6, 7),
                                  SamplingParams(max_tokens=5, temperature=0, ignore_eos=True),
                                  Mixture.one("med", 0.5)),
                GenerationRequest("b", (5, 6), SamplingParams(max_tokens=3, temperature=0, ignore_eos=True),
                                  Mixture()),
                GenerationRequest("c", (8, 9), SamplingParams(max_tokens=4, temperature=0, ignore_eos=True),
                                  Mixture.one("med", 0.0)),
            ]
            async def consume(r):
                return [o async for o in engine.generate(r)]

            await asyncio.gather(*(consume(r) for r in reqs))

        asyncio.run(main())
    finally:
        engine.shutdown()
    assert sample(metrics, "memdec_generation_tokens_total", memory="med") == 5
    # alpha 0 = the base alone
    assert sample(metrics, "memdec_generation_tokens_total", memory="none") == 3 + 4
    assert sample(metrics, "memdec_prompt_tokens_total", memory="med") == 3
    assert sample(metrics, "memdec_time_to_first_token_seconds_count", memory="med") == 1
    assert sample(metrics, "memdec_time_to_first_token_seconds_count", memory="none") == 2
    assert sample(metrics, "memdec_inter_token_latency_seconds_count", memory="med") == 4
    assert sample(metrics, "memdec_e2e_request_latency_seconds_count", memory="none") == 2
    assert sample(metrics, "memdec_step_phase_seconds_count", phase="memory_forward") >= 5
    assert sample(metrics, "memdec_step_phase_seconds_sum", phase="base_forward") > 0
    assert sample(metrics, "memdec_memory_parameters", memory="med") == registry.get("med").num_parameters
    assert sample(metrics, "memdec_requests_running") == 0 and sample(metrics, "memdec_requests_waiting") == 0


def test_a_routed_request_counts_under_its_memory(zoo, tmp_path):
    """`"alpha": "auto"` mixes its memory at every token (α_t from the router), so its tokens and latencies
    are the memory's, not the base's alone."""
    from tests.test_router import _random_router, _with_router

    metrics = Metrics()
    base = load_base(ModelConfig(str(zoo.base)))
    registry = MemoryRegistry(base)
    registry.on_loaded = metrics.memory_loaded
    registry.load("rmed", str(_with_router(zoo.mem_llama, tmp_path / "rmed", _random_router(4, 0))))
    engine = AsyncEngine(base, registry, EngineConfig(), observer=MetricsObserver(metrics))
    engine.start()
    try:
        async def main():
            request = GenerationRequest("a", (5, 6, 7),
                                        SamplingParams(max_tokens=4, temperature=0, ignore_eos=True),
                                        Mixture.auto("rmed"))
            return [o async for o in engine.generate(request)]

        asyncio.run(main())
    finally:
        engine.shutdown()
    assert sample(metrics, "memdec_generation_tokens_total", memory="rmed") == 4
    assert sample(metrics, "memdec_generation_tokens_total", memory="none") == 0
    assert sample(metrics, "memdec_e2e_request_latency_seconds_count", memory="rmed") == 1
