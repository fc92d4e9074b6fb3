"""Moved to `testkit` (shared with the benchmarks); this name stays for the engine tests until they import
`testkit` directly."""

from testkit.models import build_memory, build_model, build_tokenizer
from testkit.text import sample_text

__all__ = ["build_memory", "build_model", "build_tokenizer", "sample_text"]
