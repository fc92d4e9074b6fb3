"""Fixtures shared by the test modules: the tiny model zoo, the independent HF reference over it, and
`memdec serve` as a real process."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from server.config import MemorySpec, ModelConfig, ServerConfig
from server.loader import LoadedModel, load_base
from server.registry import MemoryRegistry
from testkit.models import build_chat_model, build_memory, build_model, build_tokenizer
from testkit.server import Server, serve
from testkit.text import sample_text
from tests.api_harness import InProcessServer, load_hf

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@dataclass(frozen=True)
class TinyZoo:
    """Paths of tiny models sharing one tokenizer, plus one memory with a foreign tokenizer."""

    tokenizer: Path
    base: Path  # GPT-2 shape
    # the same model as `base`, its tokenizer with a chat template (testkit.models.CHAT_TEMPLATE)
    chat_base: Path
    llama_base: Path  # Llama shape
    mem_llama: Path  # memory "med", Llama shape
    mem_qwen_padded: Path  # memory "law", Qwen2 shape, embedding padded beyond len(tokenizer)
    mem_gpt2: Path  # memory "fin", GPT-2 shape
    mem_foreign: Path  # memory "alien": different tokenizer


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> TinyZoo:
    root = tmp_path_factory.mktemp("zoo")
    tok = build_tokenizer(root / "tokenizer")
    foreign_tok = build_tokenizer(root / "foreign_tokenizer", vocab_size=300,
                                  text=sample_text("legal", 20_000))
    return TinyZoo(
        tokenizer=root / "tokenizer",
        base=build_model(root / "base", tok, "gpt2", seed=1),
        chat_base=build_chat_model(root / "chat_base", tok, "gpt2", seed=1),
        llama_base=build_model(root / "llama_base", tok, "llama", seed=2),
        mem_llama=build_memory(root / "mem_llama", tok, "med", "llama", alpha=0.6, domain="biomedical",
                               hidden=48, seed=3),
        mem_qwen_padded=build_memory(
            root / "mem_qwen", tok, "law", "qwen2", alpha=0.4, domain="legal", extra_vocab=61, hidden=32,
            seed=4
        ),
        mem_gpt2=build_memory(root / "mem_gpt2", tok, "fin", "gpt2", alpha=0.7, domain="finance", hidden=32,
                              seed=5),
        mem_foreign=build_memory(root / "mem_foreign", foreign_tok, "alien", "llama", hidden=32, seed=6),
    )


@pytest.fixture(scope="module")
def setup(zoo: TinyZoo) -> tuple[LoadedModel, MemoryRegistry]:
    """What the engine tests serve, fresh per module: the zoo's base with memories med, law and fin."""
    base = load_base(ModelConfig(str(zoo.base)))
    registry = MemoryRegistry(base)
    registry.load("med", str(zoo.mem_llama))
    registry.load("law", str(zoo.mem_qwen_padded))
    registry.load("fin", str(zoo.mem_gpt2))
    return base, registry


@dataclass(frozen=True)
class HFReference:
    """The zoo's base and memories as plain transformers models (float32, no memdec code): what every
    served result is checked against."""

    tok: PreTrainedTokenizerBase
    base: Any
    med: Any  # zoo.mem_llama
    law: Any  # zoo.mem_qwen_padded

    @property
    def vocab(self) -> int:
        return len(self.tok)

    def encode(self, text: str) -> list[int]:
        return self.tok(text)["input_ids"]


@pytest.fixture(scope="module")
def med_law_server(zoo: TinyZoo) -> Iterator[InProcessServer]:
    """The tiny base served in process with the memories "med" (Llama) and "law" (Qwen2, padded
    vocabulary)."""
    config = ServerConfig(
        model=ModelConfig(str(zoo.base)),
        memories=(MemorySpec("med", str(zoo.mem_llama)), MemorySpec("law", str(zoo.mem_qwen_padded))),
    )
    with InProcessServer(config) as s:
        yield s


@pytest.fixture(scope="session")
def ref(zoo: TinyZoo) -> HFReference:
    return HFReference(
        AutoTokenizer.from_pretrained(str(zoo.base)), load_hf(zoo.base), load_hf(zoo.mem_llama),
        load_hf(zoo.mem_qwen_padded)
    )


LiveServer = Callable[..., AbstractContextManager[Server]]


@pytest.fixture(scope="session")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> LiveServer:
    """`with live_server(name, args, env=None) as s:` runs `memdec serve ARGS` on a free port until /ready,
    then stops it with SIGTERM; it must exit 0 (a clean graceful shutdown)."""

    @contextmanager
    def start(name: str, args: list[str], env: dict[str, str] | None = None) -> Iterator[Server]:
        log = tmp_path_factory.mktemp(name) / "server.log"
        with serve(args, log, env=env) as s:
            yield s
        assert s.proc.returncode == 0, s.logs()[-5000:]

    return start
