"""Tiny GGUF files for tests: a small HF Llama directory (`testkit.models.build_model(..., "llama")`) written
as llama.cpp writes it, so that the GGUF paths (`memdec serve --model FILE.gguf`, GGUF memories, the
toolkit's `--init-from`) are tested on real files, with no model download and no llama.cpp build.

`write_gguf` mirrors llama.cpp's `convert_hf_to_gguf.py` for `LlamaForCausalLM`, through the `gguf` package
that script uses:

- metadata: the `llama.*` hyperparameters (context, embedding and feed-forward lengths, block count, head
  counts, RMS-norm epsilon, rope base and dimension count, vocab size), `general.file_type` and
  `general.quantization_version`;
- tokenizer: a byte-level BPE as `tokenizer.ggml.model = "gpt2"` (`pre = "gpt-2"`): the tokens in id order
  (ids the vocabulary lacks as `[PAD<i>]`, UNUSED) with their types (added special tokens CONTROL, other
  added tokens USER_DEFINED), then what `gguf.SpecialVocab` reads from the directory, as the script does:
  merges, bos/eos/unk/pad ids, add-bos/eos flags, chat template;
- tensors: llama.cpp's names (`gguf.get_tensor_name_map`: token_embd, blk.N.attn_q …, output_norm, output),
  q and k permuted to llama.cpp's rope layout (transformers reverse-permutes them on load). 1-D tensors (the
  norms) stay F32; matrices are stored as `qtype` by `gguf.quants.quantize`, falling back to F16 where a row
  is no whole number of blocks, as the script does. Q8_0 and Q4_1 blocks hold 32 values: the tiny models'
  hidden and intermediate sizes must be multiples of 32 for their matrices to be quantized at all.

`architecture` renames `general.architecture` (and the metadata keys' prefix) only: a file whose
architecture a loader does not know.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import load_file
from transformers import AutoConfig

QTYPES = {
    "F32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "F16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "Q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "Q4_1": (gguf.GGMLQuantizationType.Q4_1, gguf.LlamaFileType.MOSTLY_Q4_1),
}


def rope_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute`: each head's rows from HF's rotate-half order to interleaved pairs."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def store(weights: np.ndarray, name: str, qtype: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """The data and ggml type llama.cpp stores a float32 tensor (llama.cpp's name `name`) as under `qtype`."""
    target = QTYPES[qtype][0]
    if weights.ndim <= 1 or name.endswith("_norm.weight"):
        target = gguf.GGMLQuantizationType.F32
    try:
        return gguf.quants.quantize(weights, target), target
    except gguf.QuantError:  # a row that is no whole number of blocks
        return gguf.quants.quantize(weights, gguf.GGMLQuantizationType.F16), gguf.GGMLQuantizationType.F16


def _vocab(hf_dir: Path, n_vocab: int) -> tuple[list[str], list[int]]:
    """Tokens in id order and their types, as `TextModel.get_vocab_base` builds them from tokenizer.json."""
    data = json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8"))
    by_id = {i: t for t, i in data["model"]["vocab"].items()}
    added = {a["id"]: a for a in data.get("added_tokens", [])}
    by_id.update({i: a["content"] for i, a in added.items()})
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, [int(t) for t in types]


def write_gguf(
    hf_dir: Path,
    out: Path,
    qtype: str = "F32",
    *,
    architecture: str = "llama",
    chat_template: str | None = None,
) -> Path:
    """Convert the HF Llama directory `hf_dir` (model.safetensors + tokenizer.json) to the GGUF file `out`,
    its matrices stored as `qtype` (F32, F16, Q8_0 or Q4_1). `chat_template` replaces the directory's own."""
    if qtype not in QTYPES:
        raise ValueError(f"qtype {qtype!r}: one of {', '.join(QTYPES)}")
    hf_dir, out = Path(hf_dir), Path(out)
    config = AutoConfig.from_pretrained(hf_dir)
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    rope = getattr(config, "rope_parameters", None) or {}
    rope_theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))

    writer = gguf.GGUFWriter(out, architecture)
    writer.add_name(hf_dir.name)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(rope_theta))
    writer.add_rope_dimension_count(head_dim)
    writer.add_file_type(QTYPES[qtype][1])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    tokens, types = _vocab(hf_dir, config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(hf_dir, load_merges=True, n_vocab=len(tokens))
    if chat_template is not None:
        special.chat_template = chat_template
    special.add_to_gguf(writer, quiet=True)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for hf_name, tensor in load_file(str(hf_dir / "model.safetensors")).items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"{hf_dir}: no llama.cpp name for tensor {hf_name}")
        data = tensor.to(torch.float32).numpy()
        if hf_name.endswith("q_proj.weight"):
            data = rope_permute(data, n_head, n_head)
        elif hf_name.endswith("k_proj.weight"):
            data = rope_permute(data, n_head, n_kv)
        data, stored = store(data, name, qtype)
        writer.add_tensor(name, data, raw_dtype=stored)

    out.parent.mkdir(parents=True, exist_ok=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
