"""Sliding-window perplexity against a plain reference loop (HF's documented recipe)."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch

from memories.mixing import mix_scalar, sweep
from memories.perplexity import sliding_windows
from server.async_engine import AsyncEngine
from server.config import EngineConfig, ModelConfig
from server.errors import InvalidRequestError
from server.loader import load_base
from server.registry import MemoryRegistry
from server.request import PerplexityRequest
from testkit.text import sample_text


@pytest.fixture(scope="module")
def engine(zoo):
    base = load_base(ModelConfig(str(zoo.base)))
    registry = MemoryRegistry(base)
    registry.load("law", str(zoo.mem_qwen_padded))
    eng = AsyncEngine(base, registry, EngineConfig())
    eng.start()
    yield eng
    eng.shutdown()


@torch.no_grad()
def reference_nll(base_model, mem_model, ids: list[int], ctx: int, stride: int, alpha: float, vocab: int):
    """HF's recipe: windows of ctx, step stride, labels -100 for already-scored tokens; per-token mix."""
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + ctx, len(ids))
        trg_len = end - prev_end
        window = torch.tensor([ids[begin:end]])
        base_lp = torch.log_softmax(base_model(window).logits[0, :, :vocab].float(), -1)
        mem_lp = torch.log_softmax(mem_model(window).logits[0, :, :vocab].float(), -1) if mem_model else None
        for pos in range(end - begin - 1):  # logits at pos predict window[pos + 1]
            target_abs = begin + pos + 1
            if target_abs < end - trg_len or target_abs == 0:
                continue
            tgt = ids[target_abs]
            b = base_lp[pos, tgt].item()
            lp = b if mem_lp is None else mix_scalar(b, mem_lp[pos, tgt].item(), alpha)
            nll -= lp
            count += 1
        prev_end = end
        if end == len(ids):
            break
    return nll, count


def test_windows_score_every_token_once():
    for n, ctx, stride in [(10, 4, 2), (1000, 128, 64), (7, 1024, 512), (300, 100, 100), (301, 64, 17)]:
        scored = [t for w in sliding_windows(n, ctx, stride) for t in range(w.score_from, w.end)]
        assert scored == list(range(1, n)) or (stride == ctx and len(scored) == len(set(scored)))
        for w in sliding_windows(n, ctx, stride):
            assert w.end - w.begin <= ctx and w.score_from > w.begin


def test_perplexity_matches_reference_loop_and_alpha_list(engine):
    base = engine.base
    mem = engine.registry.loaded("law").model
    text = sample_text("legal", 6000)
    docs = [tuple(base.tokenizer(text[:1500]).input_ids), tuple(base.tokenizer(text[1500:1800]).input_ids)]
    alphas = (0.0, 0.3, 0.7, 1.0)
    result = asyncio.run(engine.perplexity(PerplexityRequest("p", tuple(docs), sweep("law", alphas),
                                                             context_length=128, stride=48)))
    for doc, got in zip(docs, result.documents, strict=True):
        ref_base, n = reference_nll(base.model, None, list(doc), 128, 48, 0.0, base.vocab_size)
        assert got.base.num_tokens == n == len(doc) - 1
        assert math.isclose(got.base.nll, ref_base, rel_tol=1e-4)
        for a, score in zip(alphas, got.mixed, strict=True):
            ref, _ = reference_nll(base.model, mem, list(doc), 128, 48, a, base.vocab_size)
            assert math.isclose(score.nll, ref, rel_tol=1e-4), (a, score.nll, ref)
            single = asyncio.run(engine.perplexity(PerplexityRequest("s", (doc,), sweep("law", (a,)),
                                                                     128, 48)))
            assert math.isclose(single.documents[0].mixed[0].nll, score.nll, rel_tol=1e-6)
        assert math.isclose(got.memory_alone.nll, got.mixed[-1].nll, rel_tol=1e-6)
        assert math.isclose(got.base.nll, got.mixed[0].nll, rel_tol=1e-6)


def test_perplexity_defaults_and_errors(engine):
    ids = tuple(range(1, 40))
    result = asyncio.run(engine.perplexity(PerplexityRequest("d", (ids,))))
    assert (result.context_length == min(1024, engine.base.max_model_len)
            and result.stride == result.context_length // 2)
    assert result.documents[0].mixed == () and result.documents[0].base.num_tokens == len(ids) - 1
    with pytest.raises(InvalidRequestError):
        asyncio.run(engine.perplexity(PerplexityRequest("e", ((1,),))))
    with pytest.raises(InvalidRequestError):
        asyncio.run(engine.perplexity(PerplexityRequest("e", (ids,), context_length=100_000)))
    with pytest.raises(InvalidRequestError):
        asyncio.run(engine.perplexity(PerplexityRequest("e", ((1, 10**9),))))
    assert engine.is_alive
