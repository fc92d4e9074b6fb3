"""Tiny random-init models and tokenizers for tests and benchmarks, built from configs: nothing is
downloaded, and the tokenizers learn from the fixed synthetic text of `testkit.text`.

Weights are drawn with a large init range so that next-token distributions are peaked (greedy
decoding then has clear winners and mixing has visible effects), unlike a near-uniform default init.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from memories.manifest import Manifest, tokenizer_fingerprint, write_manifest
from memories.tokenizer import train_tokenizer
from testkit.text import sample_text


def build_tokenizer(out_dir: Path, vocab_size: int = 384, text: str | None = None) -> PreTrainedTokenizerFast:
    """The toolkit's byte-level BPE trainer on a small text (synthetic general English by default)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = out_dir.parent / f"{out_dir.name}.corpus.txt"
    corpus.write_text(text if text is not None else sample_text("general", 40_000), encoding="utf-8")
    return train_tokenizer(corpus, out_dir, vocab_size=vocab_size, progress=False)


def _config(arch: str, vocab_size: int, eos_id: int, max_len: int, hidden: int, layers: int):
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size, n_positions=max_len, n_embd=hidden, n_layer=layers, n_head=4,
            bos_token_id=eos_id, eos_token_id=eos_id, initializer_range=0.3,
        ), GPT2LMHeadModel
    common = dict(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_len,
        bos_token_id=eos_id, eos_token_id=eos_id, initializer_range=0.3, tie_word_embeddings=False,
    )
    if arch == "llama":
        return LlamaConfig(**common), LlamaForCausalLM
    if arch == "qwen2":
        return Qwen2Config(**common), Qwen2ForCausalLM
    raise ValueError(f"unknown arch {arch}")


def build_model(
    out_dir: Path,
    tokenizer: PreTrainedTokenizerFast,
    arch: str = "gpt2",
    *,
    extra_vocab: int = 0,
    max_len: int = 512,
    hidden: int = 64,
    layers: int = 2,
    seed: int = 0,
) -> Path:
    """A random-init causal LM saved as a HF directory (safetensors) with the tokenizer beside it.

    `extra_vocab` pads the embedding matrix beyond len(tokenizer), as Qwen2.5 checkpoints do.
    """
    torch.manual_seed(seed)
    config, cls = _config(arch, len(tokenizer) + extra_vocab, tokenizer.eos_token_id, max_len, hidden, layers)
    model = cls(config).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


# A chat template in the style of real ones (role headers, EOS ending each turn, a refusal for a malformed
# conversation), written with text markers so that it needs no tokens beyond the tiny tokenizer's.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'assistant' -%}"
    "{{ raise_exception('the conversation must not start with an assistant message') }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>\n{% endif -%}"
)


def build_chat_model(out_dir: Path, tokenizer: PreTrainedTokenizerFast, arch: str = "gpt2",
                     **model_kwargs: Any) -> Path:
    """`build_model`, with CHAT_TEMPLATE as its tokenizer's chat template (the same seed gives the same
    weights as `build_model`, so one reference model serves both)."""
    build_model(out_dir, tokenizer, arch, **model_kwargs)
    chat_tokenizer = PreTrainedTokenizerFast.from_pretrained(str(out_dir))
    chat_tokenizer.chat_template = CHAT_TEMPLATE
    chat_tokenizer.save_pretrained(out_dir)
    return out_dir


def build_memory(
    out_dir: Path,
    tokenizer: PreTrainedTokenizerFast,
    name: str,
    arch: str = "llama",
    *,
    alpha: float = 0.6,
    domain: str = "test",
    **model_kwargs: Any,
) -> Path:
    build_model(out_dir, tokenizer, arch, **model_kwargs)
    write_manifest(
        out_dir,
        Manifest(name=name, domain=domain, alpha=alpha,
                 tokenizer_fingerprint=tokenizer_fingerprint(tokenizer)),
    )
    return out_dir
