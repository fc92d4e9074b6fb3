"""Issue 17's fidelity targets for `"memory": "auto"` and several memories, measured on the demo through a
real server (`memdec serve` with no flags serves `demo/`: the demo base, SmolLM2-135M-Instruct from GGUF, and
its memories), with the official API only.

- **Automatic choice, in domain.** 256-token snippets of each domain's `valid.txt` sent as prompts with
  `"memory": "auto"`: how often the choice (the response's `memory` field) is that domain's memory.
- **Automatic choice, general text.** Each 256-token snippet of `general/valid.txt` is split in two: the
  choice is made on the first 128 tokens (the prompt of a completion), and the *next* 128 tokens are scored
  under what was chosen and under the base alone — text the choice never saw, so this can come out worse
  than the base. (Scoring the prompt itself under its own argmin could not: the base alone is a candidate.)
  The continuation's NLL is `/v1/perplexity` of all 256 tokens minus that of the first 128: both fit one
  window, so the first 128 tokens' log-probs are the same in both.
- **Two memories at once** on text that mixes two domains (128-token pieces of their `valid.txt` alternating,
  equal shares of both): each memory alone at its α, and both at half their α each —
  `"memory": [a, b], "alpha": [α_a/2, α_b/2]`, the equal-weight average of the two single-memory mixtures
  (p = ½(α_a·p_a + (1−α_a)·p_base) + ½(α_b·p_b + (1−α_b)·p_base)), a rule fixed before measuring.

    python -m bench.adaptive_fidelity [--snippets 40] [--mixed-tokens 5000]

Writes bench/results/adaptive_fidelity.json.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import httpx

from bench.common import ROOT, demo_base_path, write_result
from memories.models import load_tokenizer
from testkit.server import serve

DATA = ROOT.parent / "shared" / "data"
DOMAINS = {"biomedical": "biomed", "legal": "legal", "finance": "finance"}
SNIPPET = 256


def token_ids(tokenizer, path: Path, n: int) -> list[int]:
    """The first `n` tokens of a text file (read only as far as needed)."""
    ids: list[int] = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            ids += tokenizer(line, add_special_tokens=False)["input_ids"]
            if len(ids) >= n:
                break
    return ids[:n]


def interleaved(tokenizer, a: Path, b: Path, n: int, block: int = 128) -> list[int]:
    """`n` tokens alternating `block`-token pieces of the two files (a, b, a, b, ...): equal shares of both.
    (Alternating *lines* was tried first and dropped: finance's lines are short, so its share was 16-18%.)"""
    ta, tb = token_ids(tokenizer, a, n // 2), token_ids(tokenizer, b, n // 2)
    ids: list[int] = []
    for i in range(0, n // 2, block):
        ids += ta[i : i + block] + tb[i : i + block]
    return ids


def total_nll(client: httpx.Client, ids: list[int], memory, alpha=None) -> tuple[float, int]:
    """(summed NLL in nats, tokens scored) of a token-id document under the given target."""
    body = {"input": ids, "memory": memory}
    if alpha is not None:
        body["alpha"] = alpha
    r = client.post("/v1/perplexity", json=body)
    r.raise_for_status()
    d = r.json()["data"][0]
    return d["nll"] * d["num_tokens"], d["num_tokens"]


def choose(client: httpx.Client, ids: list[int]) -> str | None:
    r = client.post("/v1/completions",
                    json={"prompt": ids, "memory": "auto", "max_tokens": 1, "temperature": 0})
    r.raise_for_status()
    return r.json().get("memory")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--snippets", type=int, default=40,
                    help="256-token snippets per domain and of general text")
    ap.add_argument("--mixed-tokens", type=int, default=5000, help="tokens of each two-domain text")
    args = ap.parse_args()
    base = demo_base_path()
    if base is None:
        raise SystemExit(2)
    tokenizer = load_tokenizer(base)  # the demo base's, from its GGUF file: the ids the server reads
    log = Path(tempfile.mkdtemp(prefix="memdec-fidelity-")) / "server.log"
    out: dict = {"snippet_tokens": SNIPPET, "snippets": args.snippets}
    with serve([], log) as server, httpx.Client(base_url=server.url, timeout=600) as client:
        alphas = {m["id"]: m["alpha"] for m in client.get("/v1/memories").json()["data"]}
        out["alphas"] = alphas

        picks: dict[str, dict[str, int]] = {}
        for domain, own in DOMAINS.items():
            ids = token_ids(tokenizer, DATA / domain / "valid.txt", SNIPPET * args.snippets)
            counts: dict[str, int] = {}
            for i in range(args.snippets):
                name = choose(client, ids[i * SNIPPET : (i + 1) * SNIPPET]) or "none"
                counts[name] = counts.get(name, 0) + 1
            picks[domain] = counts
            print(f"auto on {domain:<10} snippets: own memory ({own}) {counts.get(own, 0)}/{args.snippets}  "
                  f"{counts}", flush=True)
        out["auto_picks"] = picks

        ids = token_ids(tokenizer, DATA / "general" / "valid.txt", SNIPPET * args.snippets)
        half = SNIPPET // 2
        base_nll = auto_nll = 0.0
        tokens = 0
        general_picks: dict[str, int] = {}
        for i in range(args.snippets):
            snippet = ids[i * SNIPPET : (i + 1) * SNIPPET]
            name = choose(client, snippet[:half])
            general_picks[name or "none"] = general_picks.get(name or "none", 0) + 1
            for target, acc in ((None, "base"), (name, "auto")):
                full, n_full = total_nll(client, snippet, target)
                head, n_head = total_nll(client, snippet[:half], target)
                if acc == "base":
                    base_nll += full - head
                else:
                    auto_nll += full - head
            tokens += n_full - n_head
        general = {"tokens": tokens, "picks": general_picks, "base_ppl": math.exp(base_nll / tokens),
                   "auto_ppl": math.exp(auto_nll / tokens)}
        general["ratio"] = general["auto_ppl"] / general["base_ppl"]
        out["auto_general"] = general
        print(f"auto on general text: continuation perplexity {general['auto_ppl']:.1f} "
              f"vs base {general['base_ppl']:.1f} "
              f"({general['ratio']:.3f}×; picks {general_picks})", flush=True)

        pairs = []
        names = list(DOMAINS.items())
        for i in range(len(names)):
            for j in range(i + 1, len(names)):
                (da, a), (db, b) = names[i], names[j]
                ids = interleaved(tokenizer, DATA / da / "valid.txt", DATA / db / "valid.txt",
                                  args.mixed_tokens)
                row = {"text": f"{da}+{db}", "tokens": len(ids)}
                for key, memory, alpha in (("base", None, None), (a, a, alphas[a]), (b, b, alphas[b]),
                                           ("both", [a, b], [alphas[a] / 2, alphas[b] / 2])):
                    nll, n = total_nll(client, ids, memory, alpha)
                    row[key] = math.exp(nll / n)
                row["both_beats_each"] = row["both"] < min(row[a], row[b])
                pairs.append(row)
                print(f"{row['text']:<20} base {row['base']:.1f}  {a} {row[a]:.1f}  {b} {row[b]:.1f}  "
                      f"both {row['both']:.1f}", flush=True)
        out["two_memories"] = pairs
    path = write_result("adaptive_fidelity", out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
