"""Dependencies by role: the server runs without the toolkit's faiss and matplotlib, and the image installs
the versions the tests run against (constraints.txt)."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]
TOOLKIT_ONLY = ("faiss", "matplotlib")

# Makes `import faiss` / `import matplotlib` fail, as on a server-only install.
BLOCK = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {TOOLKIT_ONLY!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Block())
"""


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + code], capture_output=True, text=True, cwd=REPO,
                          timeout=300)


def test_server_imports_and_parses_without_the_toolkit_extra():
    res = _python(
        "import server.engine, server.registry, server.async_engine\n"
        "from server.api.app import create_app\n"
        "from server.config import ModelConfig, ServerConfig\n"
        "from server.cli import build_parser\n"
        "create_app(ServerConfig(model=ModelConfig('m'))).openapi()\n"
        "args = build_parser().parse_args(['serve', '--model', 'm', '--port', '9'])\n"
        "assert args.port == 9\n"
        f"assert not any(m.split('.')[0] in {TOOLKIT_ONLY!r} for m in sys.modules)\n"
        "print('served without the toolkit')\n"
    )
    assert res.returncode == 0 and "served without the toolkit" in res.stdout, res.stderr[-3000:]


def test_toolkit_commands_say_which_extra_is_missing(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("some text\n")
    res = _python(
        "from memories.cli import main\n"
        f"raise SystemExit(main(['memory', 'datastore', '--base', {str(tmp_path)!r}, "
        f"'--corpus', {str(corpus)!r}, '--out', {str(tmp_path / 'ds')!r}, '--quiet']))\n"
    )
    assert res.returncode == 2, res.stderr[-3000:]
    assert "faiss is missing; install memdec[toolkit]" in res.stderr


def test_faiss_and_matplotlib_are_in_the_toolkit_extra_only():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=!~ \[]", d)[0].lower() for d in project["dependencies"]}
    toolkit = {re.split(r"[<>=!~ \[]", d)[0].lower() for d in project["optional-dependencies"]["toolkit"]}
    assert toolkit == {"faiss-cpu", "matplotlib"} and not names & toolkit


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def test_constraints_pin_what_the_tests_run_against():
    pins = _pins()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    runtime = [re.split(r"[<>=!~ \[]", d)[0].lower() for d in project["dependencies"]]
    assert set(runtime) <= set(pins), set(runtime) - set(pins)  # every server dependency is pinned
    for name, version in pins.items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        assert installed.split("+")[0] == version, f"{name}: installed {installed}, pinned {version}"


def test_the_image_installs_through_the_constraints():
    text = (REPO / "Dockerfile").read_text()
    installs = [line for line in text.replace("\\\n", " ").splitlines()
                if "pip install" in line and "TORCH_SPEC" in line]
    assert installs and all("-c /src/constraints.txt" in line for line in installs)
    assert "pip install -c constraints.txt --no-build-isolation ." in text
    assert "!constraints.txt" in (REPO / ".dockerignore").read_text().split()
