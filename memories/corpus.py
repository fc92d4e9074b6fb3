"""Read a corpus (a text file, one document per line, or a directory of them) into one token stream.

Documents are tokenised without special tokens and each is followed by EOS, so the stream reads like
the base model's pre-training data and the model sees where documents end.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

TEXT_SUFFIXES = (".txt", ".text", ".md")


class CorpusError(ValueError):
    """The corpus path is missing, empty or unreadable."""


def no_text_files(path: Path) -> CorpusError:
    return CorpusError(f"{path} holds no text files ({', '.join(TEXT_SUFFIXES)})")


def corpus_files(path: str | Path) -> list[Path]:
    """The text files of a corpus: the file itself, or the text files under a directory, sorted."""
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise no_text_files(path)
        return files
    raise CorpusError(f"corpus {path} does not exist")


def corpus_identity(path: str | Path) -> list[dict[str, Any]]:
    """Path, size and mtime of every file: enough to notice that a cached stage's input changed."""
    return [
        {"path": str(p.resolve()), "size": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns}
        for p in corpus_files(path)
    ]


def iter_documents(path: str | Path) -> Iterator[str]:
    """Non-empty lines of every corpus file, trailing newline removed."""
    for file in corpus_files(path):
        with file.open(encoding="utf-8", errors="replace") as f:
            for line in f:
                line = line.rstrip("\r\n")
                if line.strip():
                    yield line


@dataclass(frozen=True)
class CorpusStats:
    files: int
    documents: int
    tokens: int
    characters: int
    truncated: bool  # stopped at max_tokens before the corpus ended

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def tokenize_corpus(
    tokenizer: Any,
    path: str | Path,
    max_tokens: int | None = None,
    batch_docs: int = 512,
    progress: bool = True,
) -> tuple[np.ndarray, CorpusStats]:
    """The corpus as one int32 token stream [N] (EOS after each document), cut at `max_tokens`."""
    eos = tokenizer.eos_token_id
    chunks: list[np.ndarray] = []
    total = docs = chars = 0
    truncated = False
    batch: list[str] = []
    bar = tqdm(desc="tokenize", unit="tok", disable=not progress, total=max_tokens)

    def flush() -> bool:
        nonlocal total, docs, chars, truncated
        encoded = tokenizer(batch, add_special_tokens=False)["input_ids"]
        for text, ids in zip(batch, encoded, strict=True):
            if eos is not None:
                ids = [*ids, eos]
            arr = np.asarray(ids, dtype=np.int32)
            if max_tokens is not None and total + len(arr) >= max_tokens:
                arr = arr[: max_tokens - total]
                truncated = True
            chunks.append(arr)
            total += len(arr)
            docs += 1
            chars += len(text)
            bar.update(len(arr))
            if truncated:
                return False
        batch.clear()
        return True

    files = corpus_files(path)
    for doc in iter_documents(path):
        batch.append(doc)
        if len(batch) >= batch_docs and not flush():
            break
    if batch and not truncated:
        flush()
    bar.close()
    if total < 2:
        raise CorpusError(f"corpus {path} has fewer than 2 tokens")
    tokens = np.concatenate(chunks).astype(np.int32, copy=False)
    return tokens, CorpusStats(len(files), docs, int(total), chars, truncated)

