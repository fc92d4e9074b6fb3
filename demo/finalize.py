"""Copy the recipe's final models into demo/ as float16 safetensors, with plots and a results table.

Reads the recipe work dir (base, base-small, memories/<name>, eval-small/<name>, eval-general) and
writes <dest>/{tokenizer,base,base-small,memories/<name>,plots/<domain>.png,results.json,results.md}.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from memories.manifest import read_manifest, write_manifest

MEMORIES = {"biomed": "biomedical", "legal": "legal", "finance": "finance"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "memdec.json", *TOKENIZER_FILES)


def _copy_tokenizer(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copyfile(src / name, dst / name)


def _half(src: Path, dst: Path) -> int:
    """Save `src` as float16 safetensors in `dst` (config, weights, tokenizer); returns its parameter count."""
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32, use_safetensors=True)
    model = model.to(torch.float16)
    if dst.exists():
        shutil.rmtree(dst)
    model.save_pretrained(dst, safe_serialization=True)
    _copy_tokenizer(src, dst)
    return sum(p.numel() for p in model.parameters())


def _curve(report: dict[str, Any]) -> tuple[list[float], list[float]]:
    alphas = [0.0] + [r["alpha"] for r in report["mixture"]] + [1.0]
    ppls = [report["base_ppl"]] + [r["ppl"] for r in report["mixture"]] + [report["memory_ppl"]]
    return alphas, ppls


def _at(report: dict[str, Any], alpha: float) -> float:
    return min(report["mixture"], key=lambda r: abs(r["alpha"] - alpha))["ppl"]


def _plot(domain: str, name: str, big: dict[str, Any], small: dict[str, Any], alpha: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 3.6), dpi=100)
    for label, rep, color in (("base", big, "tab:blue"), ("base-small", small, "tab:orange")):
        a, p = _curve(rep)
        ax.plot(a, p, marker="o", markersize=3, color=color, label=f"{label} + {name}")
        ax.scatter([alpha], [_at(rep, alpha)], color=color, edgecolor="black", zorder=3)
    ax.axvline(alpha, color="grey", linestyle=":", label=f"recommended α = {alpha:.2f}")
    ax.set_xlabel("α (weight of the memory; 0 = base alone, 1 = memory alone)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_yscale("log")
    ax.set_title(f"{domain} valid.txt, {big['tokens_scored']} tokens")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--dest", type=Path, required=True)
    a = p.parse_args()
    work, dest = a.work, a.dest
    dest.mkdir(parents=True, exist_ok=True)
    _copy_tokenizer(work / "tokenizer", dest / "tokenizer")
    params = {"base": _half(work / "base", dest / "base"), "base-small": _half(work / "base-small", dest / "base-small")}
    general = json.loads((work / "eval-general" / "evaluation.json").read_text())
    results: dict[str, Any] = {
        "general": {"base_ppl": general["base_ppl"], "base_small_ppl": general["memory_ppl"],
                    "tokens_scored": general["tokens_scored"]},
        "parameters": params,
        "memories": {},
    }
    (dest / "plots").mkdir(exist_ok=True)
    for name, domain in MEMORIES.items():
        src = work / "memories" / name
        out = dest / "memories" / name
        params[name] = _half(src, out)
        manifest = read_manifest(src)
        # Paths of the work dir mean nothing to a user of the shipped demo.
        write_manifest(out, manifest.replace(base_model="demo/base", evaluation={
            k: v for k, v in manifest.evaluation.items() if k != "file"}))
        big = manifest.evaluation
        small = json.loads((work / "eval-small" / name / "evaluation.json").read_text())
        alpha = manifest.alpha
        results["memories"][name] = {
            "domain": domain, "alpha": alpha, "tokens_scored": big["tokens_scored"],
            "base": {"base_ppl": big["base_ppl"], "memory_ppl": big["memory_ppl"], "mixture_ppl": _at(big, alpha),
                     "best_alpha": big["best_alpha"]},
            "base-small": {"base_ppl": small["base_ppl"], "memory_ppl": small["memory_ppl"],
                           "mixture_ppl": _at(small, alpha), "best_alpha": small["best_alpha"],
                           "best_ppl": small["best_ppl"]},
        }
        _plot(domain, name, big, small, alpha, dest / "plots" / f"{domain}.png")
    (dest / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (dest / "results.md").write_text(_table(results), encoding="utf-8")
    for top in ("tokenizer", "base", "base-small", "memories", "plots", "results.json", "results.md"):
        for f in [dest / top, *(dest / top).rglob("*")]:
            f.chmod(0o755 if f.is_dir() else 0o644)  # transformers may write weights as 0600
    print(_table(results))


def _table(r: dict[str, Any]) -> str:
    lines = [
        "| memory (domain) | α | base | memory alone | base + memory | change | base-small | base-small + memory | change |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in r["memories"].items():
        b, s = m["base"], m["base-small"]
        lines.append(
            f"| {name} ({m['domain']}) | {m['alpha']:.2f} | {b['base_ppl']:.1f} | {b['memory_ppl']:.1f} "
            f"| **{b['mixture_ppl']:.1f}** | {100 * (b['mixture_ppl'] / b['base_ppl'] - 1):+.0f}% "
            f"| {s['base_ppl']:.1f} | **{s['mixture_ppl']:.1f}** | {100 * (s['mixture_ppl'] / s['base_ppl'] - 1):+.0f}% |"
        )
    g = r["general"]
    lines.append("")
    lines.append(f"General text (general/valid.txt, {g['tokens_scored']} tokens): base {g['base_ppl']:.1f}, "
                 f"base-small {g['base_small_ppl']:.1f}.")
    p = r["parameters"]
    lines.append("Parameters: " + ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in p.items()) + ".")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
