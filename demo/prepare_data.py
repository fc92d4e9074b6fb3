"""Split ../shared/data into the demo's training corpora (deterministic, no randomness needed).

base.txt        general/train.txt + every line i ≡ 0 (mod N) of each domain's train.txt
<domain>.txt    every line i ≡ N/2 (mod N) of the domain's train.txt: the memory's corpus,
                disjoint from the base's share and spread over all of the domain's sources
"""

from __future__ import annotations

import argparse
from pathlib import Path

DOMAINS = ("biomedical", "legal", "finance")


def _lines(path: Path) -> list[str]:
    with path.open(encoding="utf-8", errors="replace") as f:
        return [line for line in f if line.strip()]


def _write(path: Path, lines: list[str]) -> None:
    """Unchanged files keep their mtime, so the toolkit's stage cache still trusts what was built from them."""
    text = "".join(lines)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="the shared data directory")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--every", type=int, default=10, help="N: the base gets 1/N of each domain's lines")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    general = _lines(a.data / "general" / "train.txt")
    base = list(general)
    for domain in DOMAINS:
        lines = _lines(a.data / domain / "train.txt")
        share = lines[:: a.every]
        memory = lines[a.every // 2 :: a.every]
        base += share
        _write(a.out / f"{domain}.txt", memory)
        print(f"{domain}: {len(share)} lines to the base, {len(memory)} to the memory corpus")
    # No shuffling needed: training draws random sequences from the whole stream.
    _write(a.out / "base.txt", base)
    print(f"base corpus: {len(general)} general + {len(base) - len(general)} domain lines")


if __name__ == "__main__":
    main()
