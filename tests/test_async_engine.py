"""The threaded engine: concurrent requests, abort on disconnect, admission and death handling."""

from __future__ import annotations

import asyncio
import time

import pytest

from memories.mixing import Mixture
from server.async_engine import AsyncEngine
from server.config import EngineConfig, ModelConfig
from server.engine import Engine
from server.errors import EngineDeadError, InvalidRequestError, QueueFullError, ServiceUnavailableError
from server.loader import load_base
from server.registry import MemoryRegistry
from server.request import FinishReason, GenerationRequest, SamplingParams
from tests.engine_helpers import run, tokens_of


@pytest.fixture
def setup(zoo):
    base = load_base(ModelConfig(str(zoo.base)))
    registry = MemoryRegistry(base)
    registry.load("med", str(zoo.mem_llama))
    return base, registry


def req(rid, n=8, memory=None, alpha=0.0, seed=None, temperature=0.0):
    return GenerationRequest(rid, (5, 6, 7, 8),
                             SamplingParams(max_tokens=n, temperature=temperature, seed=seed,
                                            ignore_eos=True), Mixture.single(memory, alpha))


async def collect(engine, request):
    return [o async for o in engine.generate(request)]


def test_concurrent_requests_match_sync_engine(setup):
    base, registry = setup
    requests = [req(f"r{i}", n=6 + i, memory="med" if i % 2 else None, alpha=0.5, seed=i, temperature=0.8)
                for i in range(6)]
    expected = run(Engine(base, registry, EngineConfig()), requests)
    engine = AsyncEngine(base, registry, EngineConfig())
    engine.start()
    try:
        async def main():
            return await asyncio.gather(*(collect(engine, r) for r in requests))

        results = asyncio.run(main())
        usage = engine.engine.cache_usage()
        assert (usage.free_pages, usage.free_slots) == (usage.usable_pages, usage.num_slots)
    finally:
        engine.shutdown()
    for r, outs in zip(requests, results, strict=True):
        assert tokens_of(outs) == tokens_of(expected[r.request_id])
        assert outs[-1].finished and outs[-1].num_output_tokens == r.params.max_tokens
    assert registry.users("med") == 0


def test_consumer_leaving_aborts_in_engine(setup):
    base, registry = setup
    engine = AsyncEngine(base, registry, EngineConfig())
    engine.start()
    try:
        async def main():
            gen = engine.generate(req("long", n=400, memory="med", alpha=0.5))
            first = await gen.__anext__()
            await gen.aclose()  # what a disconnecting client's handler does
            for _ in range(100):
                if engine.num_running == 0:
                    break
                await asyncio.sleep(0.02)
            return first

        first = asyncio.run(main())
        assert first.new_token_ids
        assert engine.num_running == 0 and registry.users("med") == 0
        usage = engine.engine.cache_usage()
        assert (usage.free_pages, usage.free_slots) == (usage.usable_pages, usage.num_slots)
    finally:
        engine.shutdown()


def test_queue_full_and_validation_raise_before_queueing(setup):
    base, registry = setup
    engine = AsyncEngine(base, registry, EngineConfig(max_num_seqs=1), max_queue=0)
    engine.start()
    try:
        with pytest.raises(QueueFullError):
            asyncio.run(collect(engine, req("q")))
        engine.max_queue = 10
        with pytest.raises(InvalidRequestError):
            asyncio.run(collect(engine, GenerationRequest("bad", (10**6,), SamplingParams())))
        engine.stop_admitting()
        with pytest.raises(ServiceUnavailableError):
            asyncio.run(collect(engine, req("late")))
    finally:
        engine.shutdown()


class _DyingObserver:
    """An observer whose queue report raises: the engine loop itself breaks, outside any step or model."""

    def on_queue(self, running: int, waiting: int) -> None:
        raise SystemExit("simulated loop death")

    def __getattr__(self, name):
        return lambda *a, **k: None


def test_dead_engine_fails_requests_and_reports_dead(setup):
    base, registry = setup
    engine = AsyncEngine(base, registry, EngineConfig(), observer=_DyingObserver())
    engine.start()
    deadline = time.monotonic() + 5
    while engine.is_alive and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not engine.is_alive
    with pytest.raises(EngineDeadError):
        asyncio.run(collect(engine, req("x")))


def test_step_failure_keeps_engine_alive(setup):
    base, registry = setup
    engine = AsyncEngine(base, registry, EngineConfig())
    calls = {"n": 0}
    real_step = engine.engine.step

    def flaky_step():
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("bug in one step")
        return real_step()

    engine.engine.step = flaky_step
    engine.start()
    try:
        first = asyncio.run(collect(engine, req("a", n=5)))
        assert first[-1].finish_reason is FinishReason.ERROR and "bug in one step" in first[-1].error
        second = asyncio.run(collect(engine, req("b", n=5)))
        assert second[-1].finish_reason is FinishReason.LENGTH and engine.is_alive
    finally:
        engine.shutdown()
