"""Train a byte-level BPE tokenizer on a corpus, for base models trained from scratch with the toolkit."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from memories.corpus import iter_documents

EOS = "<|endoftext|>"


def _limited(docs: Iterator[str], max_chars: int | None) -> Iterator[str]:
    seen = 0
    for doc in docs:
        yield doc
        seen += len(doc)
        if max_chars is not None and seen >= max_chars:
            return


def train_tokenizer(
    corpus: str | Path, out_dir: str | Path, vocab_size: int = 8192, max_chars: int | None = None,
    progress: bool = True,
) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style: every byte representable, no unknown tokens) with one special
    token, `<|endoftext|>`, used as EOS/BOS between documents. Deterministic for a given corpus."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    tok.train_from_iterator(_limited(iter_documents(corpus), max_chars), trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out)
    return hf
