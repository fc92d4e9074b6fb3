"""Admission: what a request needs before it is queued, checked and taken on the caller's thread.

A generation request is checked against the registry (its memories exist) and the KV cache (its prompt
and max_tokens fit in the whole cache, in the base and every memory it runs), then bound: each memory it
runs is acquired from the registry and held by its `Sequence` until it retires. A perplexity request is
checked and bound the same way into a `PerplexityJob`.

Invariant: a request that fails admission holds nothing (every memory acquired for it is released), and
nothing is queued; the client's mistakes are 4xx errors. Slots and pages are not taken here: the scheduler
allocates them when it schedules the request.
"""

from __future__ import annotations

from collections.abc import Callable

from memories.mixing import no_router
from server.errors import InvalidRequestError, NotFoundError
from server.kv import KVGeometry
from server.loader import LoadedModel
from server.perplexity import PerplexityJob
from server.registry import MemoryRegistry
from server.request import GenerationRequest, PerplexityRequest
from server.runner import ModelRunner
from server.sequence import MemoryUse, Sequence
from server.validation import mixture_errors, request_context, validate_generation, validate_perplexity


class Admission:
    def __init__(
        self,
        base: LoadedModel,
        registry: MemoryRegistry,
        runner: ModelRunner,
        max_model_len: int,
        prepare: Callable[[str, LoadedModel], float],
    ) -> None:
        self.base, self.registry, self.runner = base, registry, runner
        self.max_model_len = max_model_len
        self.prepare = prepare  # gives a memory its KV view and graphs (normally done when it was loaded)

    def _tokens_per_page(self, memories: list[LoadedModel]) -> list[int]:
        """Tokens one KV page holds in each model a request uses."""
        sizes = [self.runner.kv(None).block_size]
        for memory in memories:
            model = memory.model  # None once the registry freed it (this runs on the event loop thread)
            if model is None:
                raise NotFoundError("the memory is not loaded", param="memory", code="memory_not_found")
            sizes.append(self.runner.pool.page_bytes // KVGeometry.of(model.config, memory.dtype).token_bytes)
        return sizes

    def validate(self, request: GenerationRequest) -> None:
        """Raise the client's mistake as a 4xx error; nothing is queued or acquired. The mixture itself was
        checked when it was built (`Mixture`): here only what it needs of the registry and the cache."""
        memory_len, memories = None, []
        for term in request.mixture.terms:
            memory_len = min(
                memory_len or self.max_model_len,
                self.registry.get(term.memory).max_model_len,  # NotFoundError when unknown
            )
            if term in request.mixture.active:
                memories.append(self.registry.loaded(term.memory))
        validate_generation(request, self.base.vocab_size, request_context(self.max_model_len, memory_len))
        total = len(request.prompt_token_ids) + request.params.max_tokens
        pages = sum(-(-total // per_page) for per_page in self._tokens_per_page(memories))
        if pages > self.runner.pool.num_usable:
            what = (
                ""
                if not memories
                else " and the memory"
                if len(memories) == 1
                else f" and {len(memories)} memories"
            )
            raise InvalidRequestError(
                f"This request needs {pages} KV cache pages ({total} tokens in the base"
                f"{what}) but the whole cache has "
                f"{self.runner.pool.num_usable}. Reduce the prompt or max_tokens, or give the server more "
                "KV memory (--gpu-memory-utilization, --num-gpu-blocks-override).",
                param="max_tokens",
                code="kv_cache_too_small",
            )

    def sequence(self, request: GenerationRequest) -> Sequence:
        """The request validated and bound: a `Sequence` holding each memory it runs."""
        self.validate(request)
        # the mixture's active terms, bound: each model held until the sequence retires
        uses: list[MemoryUse] = []
        try:
            for term in request.mixture.active:
                memory = self.registry.acquire(term.memory)  # NotFoundError when unknown or retiring
                router = self.registry.router(term.memory) if term.routed else None
                if term.routed and router is None:
                    self.registry.release(term.memory)
                    with mixture_errors():
                        raise no_router(term.memory)
                uses.append(MemoryUse(term.memory, memory, term.alpha or 0.0, term.temperature, router))
                self.prepare(term.memory, memory)
        except Exception:
            for use in uses:
                self.registry.release(use.name)
            raise
        max_len = self.max_model_len
        for use in uses:
            max_len = request_context(max_len, use.lm.max_model_len)
        return Sequence(request, tuple(uses), self.base.eos_token_ids, max_len)

    def perplexity_job(self, request: PerplexityRequest) -> PerplexityJob:
        """The request validated and bound: a job holding each of its memories."""
        held: list[str] = []
        memories = []
        try:
            max_len = self.max_model_len
            for name in request.memory_names:
                memory = self.registry.acquire(name)
                held.append(name)
                memories.append(memory)
                max_len = request_context(max_len, memory.max_model_len)
            context, stride = validate_perplexity(request, self.base.vocab_size, max_len)
            router = self.registry.router(held[0]) if request.routed else None
            if request.routed and router is None:
                with mixture_errors():
                    raise no_router(held[0])
            for name, memory in zip(held, memories, strict=True):
                self.prepare(name, memory)
            return PerplexityJob(request, self.base, memories, context, stride, router)
        except Exception:
            for name in held:
                self.registry.release(name)
            raise
