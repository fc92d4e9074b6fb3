"""The Memory Decoder paper's WikiText-103 table, through a running server's `/v1/perplexity`.

    memdec serve --model gpt2-xl --memory wiki=Clover-Hill/MemoryDecoder-gpt2-small &   # one base per server
    python -m bench.paper_table --server http://localhost:8000 [--server URL ...] [--memory wiki]
                                [--alpha 0.55] [--text wikitext-103-test.txt] [--max-chars N]
                                [--out FILE.json]

For every server (one base each) and every memory it serves (or those named with --memory), the test text
is scored in windows of 1024 tokens advancing by 512 (the paper's protocol; each token is scored once) at α
(--alpha, default: each memory's own); the table gives the base, the memory alone and the mixture next to
the published numbers (GPT-2 small 24.89 → 13.36, medium 18.29 → 12.25, large 15.80 → 11.53, xl 14.39 →
10.93 with the 124M memory), matched by the base's served name (`gpt2`, `gpt2-medium`, ... or their hub
ids).

The text: `--text FILE` (WikiText-103's raw test split as plain text), else the `wikitext-103-raw-v1` test
split through `datasets` (its cache; set HF_DATASETS_OFFLINE=1 to forbid downloads), its lines joined as
they are.
Nothing reachable (no server, no text, no memory) is an error: a message and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

CONTEXT, STRIDE = 1024, 512
# The paper's Table (WikiText-103 test perplexity): base alone, base + the 124M GPT-2 memory.
PUBLISHED = {"gpt2": (24.89, 13.36), "gpt2-medium": (18.29, 12.25), "gpt2-large": (15.80, 11.53),
             "gpt2-xl": (14.39, 10.93)}


class Unreachable(RuntimeError):
    """What the table needs cannot be reached: a server, the text, a memory."""


def published_for(base: str) -> tuple[float, float] | None:
    """The published pair for a served base name: `gpt2-xl`, `openai-community/gpt2-xl`, `.../gpt2-xl@rev`."""
    name = base.split("@", 1)[0].rstrip("/").rsplit("/", 1)[-1].lower()
    return PUBLISHED.get(name)


def _call(url: str, body: dict[str, Any] | None = None, api_key: str | None = None,
          timeout: float | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url, data=data, headers=headers,
                                     method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise Unreachable(f"{url}: HTTP {exc.code}: {exc.read().decode(errors='replace')[:500]}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise Unreachable(f"no memdec server answers at {url} ({exc}); "
                          f"start one first (see the module's doc)") from None


def load_text(path: str | None, max_chars: int | None) -> str:
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise Unreachable(f"cannot read --text {path}: {exc}") from None
    else:
        try:
            import datasets
        except ImportError:
            raise Unreachable("no --text given and the `datasets` package is not installed") from None
        try:
            split = datasets.load_dataset("wikitext", "wikitext-103-raw-v1", split="test")
        except Exception as exc:  # noqa: BLE001 - offline, not cached, no network: all mean "not reachable"
            raise Unreachable(
                f"WikiText-103 is not reachable through `datasets` ({type(exc).__name__}: {str(exc)[:300]}); "
                "pass its raw test split as --text FILE"
            ) from None
        text = "".join(split["text"])
    if not text.strip():
        raise Unreachable("the test text is empty")
    return text[:max_chars] if max_chars else text


def rows_for(server: str, text: str, memories: list[str], alpha: float | None,
             api_key: str | None) -> list[dict[str, Any]]:
    server = server.rstrip("/")
    models = _call(f"{server}/v1/models", api_key=api_key)["data"]
    base = next(m for m in models if m.get("parent") is None)
    served = {m["id"]: m for m in models if m.get("parent") is not None}
    names = memories or sorted(served)
    if not names:
        raise Unreachable(f"{server} serves no memory; start it with --memory NAME=SOURCE")
    missing = [n for n in names if n not in served]
    if missing:
        raise Unreachable(f"{server} does not serve {', '.join(missing)} "
                          f"(it serves: {', '.join(sorted(served)) or 'none'})")
    rows = []
    for name in names:
        a = served[name]["alpha"] if alpha is None else alpha
        body = {"model": base["id"], "memory": name, "alpha": a, "input": text, "context_length": CONTEXT,
                "stride": STRIDE}
        result = _call(f"{server}/v1/perplexity", body, api_key=api_key)["overall"]
        rows.append({
            "server": server, "base": base["id"], "memory": name, "alpha": a, "tokens": result["num_tokens"],
            "base_ppl": result["base_perplexity"], "memory_ppl": result["memory_perplexity"],
            "mixed_ppl": result["perplexity"], "published": published_for(base["id"]),
        })
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"WikiText-103 test, windows {CONTEXT}, stride {STRIDE}")
    print("| base | memory | α | tokens | base | memory alone | base + memory "
          "| published base → base + memory |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        pub = f"{r['published'][0]:.2f} → {r['published'][1]:.2f}" if r["published"] else "—"
        print(f"| {r['base']} | {r['memory']} | {r['alpha']:.2f} | {r['tokens']} | {r['base_ppl']:.2f} | "
              f"{r['memory_ppl']:.2f} | {r['mixed_ppl']:.2f} | {pub} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--server", action="append", required=True,
                   help="a running memdec server's URL (repeatable)")
    p.add_argument("--memory", action="append", default=[],
                   help="memories to score (default: every one served)")
    p.add_argument("--alpha", type=float, default=None, help="α for every row (default: each memory's own)")
    p.add_argument("--text", default=None,
                   help="WikiText-103 raw test split as a text file (default: via `datasets`)")
    p.add_argument("--max-chars", type=int, default=None,
                   help="score only the first N characters (a quick check)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    a = p.parse_args(argv)
    try:
        text = load_text(a.text, a.max_chars)
        rows = [r for server in a.server for r in rows_for(server, text, a.memory, a.alpha, a.api_key)]
    except Unreachable as exc:
        print(f"paper_table: error: {exc}", file=sys.stderr)
        return 2
    print_table(rows)
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
