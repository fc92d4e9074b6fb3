"""The GPU acceptance checks (a), (b), (d) and part of (f) of bench/gpu_acceptance.py on the demo models:
`pytest -m gpu`.

The demo models are its base (SmolLM2-135M-Instruct, the GGUF file pinned in demo/base.json) and its memories.
Skipped without CUDA, or when the demo base is not installed (`python -m server.demo install`); the full
script (real shapes, overlap trace, speed) is `python -m bench.gpu_acceptance`.
"""

from __future__ import annotations

import pytest
import torch

from bench.common import demo_base_path
from bench.gpu_acceptance import (
    CHURN_CONFIGS,
    DEMO,
    DEMO_MEMORIES,
    bf16_errors,
    churn_tokens,
    engine_with,
    greedy,
    part_syncs,
    spec_tokens_identical,
    steps_without_sync,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.fixture(scope="module")
def base() -> str:
    """The demo base's GGUF file (sha256 checked); every test here runs on it."""
    path = demo_base_path()
    if path is None:
        pytest.skip("demo base not installed: python -m server.demo install")
    return path


def test_churn_tokens_identical_with_streams_and_graphs_on_and_off(base):
    runs = {name: churn_tokens("cuda", config) for name, config in CHURN_CONFIGS.items()}
    reference = runs["one stream, eager"]
    assert sum(map(len, reference.values())) > 100
    assert all(tokens == reference for tokens in runs.values())


def test_steady_decode_makes_no_implicit_sync(base):
    result = part_syncs(base, str(DEMO / "memories" / "biomed"), "cuda")
    assert result["ok"], result


def test_bf16_mixed_logprobs_within_tolerance_of_float32(base):
    memories = {m: str(DEMO / "memories" / m) for m in DEMO_MEMORIES}
    reqs = [greedy(f"d{i}", tuple(range(5 + i, 40 + 3 * i)), 8, m, 0.7) for i, m in enumerate(DEMO_MEMORIES)]
    result = bf16_errors(base, memories, "cuda", reqs)  # over the whole vocabulary (49,152 tokens)
    assert result["ok"], result


def test_speculative_rounds_keep_greedy_tokens_and_make_no_implicit_sync(base):
    """Part (f)'s checks: greedy churn tokens with K = 3 (graphs, streams) equal plain decoding's, and steady
    rounds (drafts on the device, verify graphs, acceptance) never synchronise implicitly."""
    assert spec_tokens_identical("cuda")
    engine, _ = engine_with(base, {"memory": str(DEMO / "memories" / "biomed")}, "cuda", "float32",
                            max_num_seqs=8, speculative_tokens=4, speculative_adaptive=False)
    result = steps_without_sync(engine, 10)
    assert result["ok"], result
