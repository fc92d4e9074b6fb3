"""Confine memory paths given over HTTP to --memory-root (no '..', no symlink escapes)."""

from __future__ import annotations

from pathlib import Path, PurePath

from server.errors import PermissionDeniedError


def confine(path: str, root: Path | None) -> str:
    """The directory to load: `path` as given when no root is set, else resolved strictly inside `root`.

    Relative paths are taken relative to the root; absolute ones must already lie under it. The check is
    on the fully resolved path, so a symlink inside the root that points outside is refused too.
    """
    if root is None:
        return path
    if "\x00" in path:
        raise PermissionDeniedError("memory path contains a NUL byte", param="path", code="path_not_allowed")
    if ".." in PurePath(path).parts:
        raise PermissionDeniedError("memory path must not contain '..'", param="path", code="path_not_allowed")
    base = root.resolve()
    candidate = Path(path) if Path(path).is_absolute() else base / path
    resolved = candidate.resolve()
    if resolved != base and base not in resolved.parents:
        raise PermissionDeniedError(
            "memory path lies outside the server's --memory-root", param="path", code="path_not_allowed"
        )
    return str(resolved)
