"""The conventions ruff cannot check, run by `make lint`.

- A `# fmt: skip` says why beside it, as `# fmt: skip  # <reason>` (the form ruff's formatter still honours):
  the marker freezes a hand layout, and whoever meets it should know what the layout shows.

usage: python scripts/check_style.py [PATH ...]   (default: every tracked .py file; exit 1 on a finding)
"""

from __future__ import annotations

import io
import re
import subprocess
import sys
import tokenize
from pathlib import Path

# The marker, then two spaces, `#` and at least one word of reason.
REASONED = re.compile(r"# fmt: skip  # \w")


def tracked_python(paths: list[str]) -> list[Path]:
    command = ["git", "ls-files", "--", *(paths or ["."])]
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    return [Path(p) for p in out.stdout.split() if p.endswith(".py")]


def comments(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every comment token: strings that merely mention the markers are not markers."""
    source = path.read_text(encoding="utf-8")
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    return [(t.start[0], t.line) for t in tokens if t.type == tokenize.COMMENT]


def findings(path: Path) -> list[str]:
    found = []
    for number, line in comments(path):
        if "fmt: skip" in line and not REASONED.search(line):
            found.append(f"{path}:{number}: `# fmt: skip` without a reason (write `# fmt: skip  # why`)")
        if "fmt: off" in line:
            found.append(f"{path}:{number}: `# fmt: off` (use `# fmt: skip  # why` on the one statement)")
    return found


def main(argv: list[str]) -> int:
    problems = [f for path in tracked_python(argv) for f in findings(path)]
    print("\n".join(problems) or "check_style: ok", file=sys.stderr if problems else sys.stdout)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
