from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.tiny_models import build_memory, build_model, build_tokenizer, sample_text

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@dataclass(frozen=True)
class TinyZoo:
    """Paths of tiny models sharing one tokenizer, plus one memory with a foreign tokenizer."""

    tokenizer: Path
    base: Path  # GPT-2 shape
    llama_base: Path  # Llama shape
    mem_llama: Path  # memory "med", Llama shape
    mem_qwen_padded: Path  # memory "law", Qwen2 shape, embedding padded beyond len(tokenizer)
    mem_gpt2: Path  # memory "fin", GPT-2 shape
    mem_foreign: Path  # memory "alien": different tokenizer


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> TinyZoo:
    root = tmp_path_factory.mktemp("zoo")
    tok = build_tokenizer(root / "tokenizer")
    foreign_tok = build_tokenizer(root / "foreign_tokenizer", vocab_size=300, text=sample_text("legal", 20_000))
    return TinyZoo(
        tokenizer=root / "tokenizer",
        base=build_model(root / "base", tok, "gpt2", seed=1),
        llama_base=build_model(root / "llama_base", tok, "llama", seed=2),
        mem_llama=build_memory(root / "mem_llama", tok, "med", "llama", alpha=0.6, domain="biomedical", hidden=48, seed=3),
        mem_qwen_padded=build_memory(
            root / "mem_qwen", tok, "law", "qwen2", alpha=0.4, domain="legal", extra_vocab=61, hidden=32, seed=4
        ),
        mem_gpt2=build_memory(root / "mem_gpt2", tok, "fin", "gpt2", alpha=0.7, domain="finance", hidden=32, seed=5),
        mem_foreign=build_memory(root / "mem_foreign", foreign_tok, "alien", "llama", hidden=32, seed=6),
    )
