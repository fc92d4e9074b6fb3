"""Split ../shared/data into the demo's training corpora (deterministic, no randomness needed).

base.txt                      general/train.txt + every line i ≡ 0 (mod N) of each domain's train.txt
<domain>/train/<source>.txt   the other lines of that source of the domain's train.txt: the memories' corpus,
                              disjoint from the base's share, one file per source (sources.json's ranges)
<domain>/valid/<source>.txt   that source's lines of the domain's valid.txt (evaluation only)

A memory's build reads <domain>/train and <domain>/valid as directory corpora whose files are its sources, so
it can hold a whole source out of the datastore (`memdec memory build --sources files --holdout-source …`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from memories.sources import load_spec, read_sources

DOMAINS = ("biomedical", "legal", "finance")


def _lines(path: Path) -> list[str]:
    with path.open(encoding="utf-8", errors="replace") as f:
        return [line for line in f if line.strip()]


def _write(path: Path, lines: list[str]) -> None:
    """Unchanged files keep their mtime, so the toolkit's stage cache still trusts what was built from
    them."""
    text = "".join(line if line.endswith("\n") else line + "\n" for line in lines)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")


def _memory_sources(data: Path, domain: str, out: Path, every: int) -> None:
    """Per source: the train lines the base did not get (global line index i ≢ 0 mod N), and its valid
    lines."""
    spec = load_spec(data / "sources.json", domain)
    offset = 0
    for name, docs in read_sources(data / domain / "train.txt", spec).docs.items():
        kept = [d for i, d in enumerate(docs, start=offset) if i % every]
        offset += len(docs)
        _write(out / domain / "train" / f"{name}.txt", kept)
        print(f"  {domain}/{name}: {len(kept)} lines to the memory corpus")
    for name, docs in read_sources(data / domain / "valid.txt", spec).docs.items():
        _write(out / domain / "valid" / f"{name}.txt", docs)


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
        share = _lines(a.data / domain / "train.txt")[:: a.every]
        base += share
        print(f"{domain}: {len(share)} lines to the base")
        _memory_sources(a.data, domain, a.out, a.every)
    # No shuffling needed: training draws random sequences from the whole stream.
    _write(a.out / "base.txt", base)
    print(f"base corpus: {len(general)} general + {len(base) - len(general)} domain lines")


if __name__ == "__main__":
    main()
