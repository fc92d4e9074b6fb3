"""What a memory *is*: a Hugging Face causal-LM directory plus a `memdec.json` manifest.

The manifest is the contract between the toolkit that builds a memory and the server that loads it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memories.jsonfile import write_json
from memories.mixing import check_alpha, check_temperature

MANIFEST_NAME = "memdec.json"
MANIFEST_VERSION = 1
DEFAULT_ALPHA = 0.6
# A memory served without a manifest (a published checkpoint as it is) gets the paper's λ for GPT-2.
PAPER_ALPHA = 0.55
DEFAULT_TEMPERATURE = 1.0


class ManifestError(ValueError):
    """The memory directory or its manifest is missing or malformed."""


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of the tokenizer's token -> id map (added tokens included).

    Two tokenizers with the same fingerprint map every token string to the same id, which is what
    mixing two models' next-token distributions requires; merges or normalisers that differ without
    changing the map are caught by the vocabulary check being on the map itself.
    """
    vocab = tokenizer.get_vocab()  # dict[str, int], includes added tokens
    payload = json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(payload.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Manifest:
    name: str
    tokenizer_fingerprint: str
    domain: str = "general"
    alpha: float = DEFAULT_ALPHA
    # The reference implementation's `knn_temp`: the memory's logits are divided by it before its softmax.
    temperature: float = DEFAULT_TEMPERATURE
    base_model: str | None = None
    description: str = ""
    corpus: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    # The learned per-token router (`memories.router`), when one was fitted: its files inside the memory
    # directory, its features and how it did. Empty: no router (`"alpha": "auto"` is refused).
    router: dict[str, Any] = field(default_factory=dict)
    version: int = MANIFEST_VERSION

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ManifestError("manifest 'name' must be a non-empty string")
        try:
            check_alpha(self.alpha)
        except ValueError as exc:
            raise ManifestError(f"manifest 'alpha': {exc}") from None
        try:
            check_temperature(self.temperature)
        except ValueError as exc:
            raise ManifestError(f"manifest 'temperature': {exc}") from None
        if not str(self.tokenizer_fingerprint).startswith("sha256:"):
            raise ManifestError("manifest 'tokenizer_fingerprint' must look like 'sha256:<hex>'")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> Manifest:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        known = {f.name for f in dataclasses.fields(cls)}
        missing = {"name", "tokenizer_fingerprint"} - data.keys()
        if missing:
            raise ManifestError(f"manifest is missing {sorted(missing)}")
        # Unknown keys are kept out rather than refused so that newer manifests still load.
        return cls(**{k: v for k, v in data.items() if k in known})


def manifest_path(memory_dir: str | Path) -> Path:
    return Path(memory_dir) / MANIFEST_NAME


def read_manifest(memory_dir: str | Path) -> Manifest:
    path = manifest_path(memory_dir)
    if not path.is_file():
        raise ManifestError(f"{memory_dir} has no {MANIFEST_NAME}: not a memdec memory directory")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ManifestError(f"{path} must hold a JSON object")
    return Manifest.from_dict(data)


def write_manifest(memory_dir: str | Path, manifest: Manifest) -> Path:
    return write_json(manifest_path(memory_dir), manifest.to_dict())  # a server never reads half a manifest
