"""JSON files written atomically: a reader (or a crash) never sees half a file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_json(path: str | Path, data: Any, indent: int | None = 2) -> Path:
    """Write `data` as indented UTF-8 JSON through a temporary file renamed over `path`.

    Marker files (datastore.json, targets.json, stage records) are written last to say "complete", so
    they must appear whole or not at all.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=indent, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_marker(path: Path, error: type[Exception], what: str) -> Any:
    """The marker a stage writes last (`write_json`): its absence means the directory is incomplete."""
    if not path.is_file():
        raise error(f"{path.parent} holds no complete {what} (no {path.name})")
    return read_json(path)
