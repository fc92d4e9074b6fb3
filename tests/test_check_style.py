"""`scripts/check_style.py`, which `make lint` runs: a `# fmt: skip` needs its reason, `# fmt: off` is
refused, and text that merely mentions the markers (a string, a docstring) is not a marker."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "check_style.py"


def _module():
    spec = importlib.util.spec_from_file_location("check_style", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_markers_without_a_reason_are_found_and_mentions_are_not(tmp_path):
    source = tmp_path / "sample.py"
    source.write_text(
        '"""Write `# fmt: skip  # why`; never `# fmt: off`."""\n'
        "A = (1,  2)  # fmt: skip\n"
        "B = (1,  2)  # fmt: skip  # aligned with A\n"
        'C = "# fmt: skip"\n'
        "# fmt: off\n"
        "D = (1,  2)  # fmt: skip - a reason ruff's formatter does not honour\n",
        encoding="utf-8",
    )
    found = _module().findings(source)
    assert [f.split(":")[1] for f in found] == ["2", "5", "6"], found
    assert "without a reason" in found[0] and "fmt: off" in found[1]


def test_the_repository_passes():
    out = subprocess.run([sys.executable, str(SCRIPT)], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
