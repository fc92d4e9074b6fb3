"""Memory paths given over HTTP: confined to --memory-root (no '..', no symlink escapes) and usable."""

from __future__ import annotations

import os
from pathlib import Path, PurePath

from memories.models import is_hub_id, split_revision
from server.errors import MemoryLoadError, PermissionDeniedError


def confine(path: str, root: Path | None, allow_hub: bool = False) -> str:
    """The memory to load: `path` as given when no root is set, else resolved strictly inside `root`, or a
    hub id (`org/name[@revision]`, nothing of that name under the root) when `allow_hub`
    (--allow-hub-memories).

    Relative paths are taken relative to the root; absolute ones must already lie under it. The check is
    on the fully resolved path, so a symlink inside the root that points outside is refused too.
    """
    if root is None:
        return path
    if _hub_id_under(path, root):
        if not allow_hub:
            raise PermissionDeniedError(
                f"nothing named {path!r} lies under the server's --memory-root, and loading it as a Hugging "
                "Face hub id is off (start the server with --allow-hub-memories to let an admin load hub "
                "memories)",
                param="path",
                code="hub_not_allowed",
            )
        return path
    if "\x00" in path:
        raise PermissionDeniedError("memory path contains a NUL byte", param="path", code="path_not_allowed")
    if ".." in PurePath(path).parts:
        raise PermissionDeniedError("memory path must not contain '..'", param="path",
                                    code="path_not_allowed")
    base = root.resolve()
    candidate = Path(path) if Path(path).is_absolute() else base / path
    resolved = candidate.resolve()
    if resolved != base and base not in resolved.parents:
        raise PermissionDeniedError(
            "memory path lies outside the server's --memory-root", param="path", code="path_not_allowed"
        )
    return str(resolved)


def _hub_id_under(path: str, root: Path) -> bool:
    """An `org/name[@revision]` hub id that names nothing under the root (a relative path that exists there is
    a directory; a bare `name` under a root is a directory name, so a missing one is "does not exist")."""
    repo = split_revision(path)[0]
    if "/" not in repo or not is_hub_id(path):
        return False
    try:
        return not (root / repo).exists()
    except (OSError, ValueError):
        return False


def check_lookup(path: str) -> None:
    """Refuse, as the client's mistake, a path the OS cannot even look up (a NUL byte, a name too long, a
    symlink loop, no permission), so that such an OSError never surfaces as a 500. A path that does not
    exist passes: the registry explains that it is not a memory directory."""
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise MemoryLoadError(f"memory path cannot be used: {reason}", param="path",
                              code="invalid_path") from None
