"""Copy the recipe's memories into demo/ as float16 safetensors, with plots and results tables.

Reads the recipe work dir (memories/<name>, loso/<domain>/without-<source>,
eval-alpha-check/<domain>-<source>, eval-specificity/<name>, times.txt) and writes
<dest>/{memories/<name>,plots/<domain>.png,results.json,results.md}. The base is not copied: it is the
registry file pinned in <dest>/base.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from memories.crosseval import CROSS_SOURCE, IN_SOURCE, ppl_at
from memories.evaluate import relative_curve
from memories.jsonfile import read_json
from memories.manifest import Manifest, read_manifest, write_manifest

MEMORIES = {"biomed": "biomedical", "legal": "legal", "finance": "finance"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
GENERAL = "general"  # the specificity evaluation's general-text label (recipe.sh)
# what the shipped manifests name as their base
BASE_MODEL = "SmolLM2-135M-Instruct.Q4_1.gguf (demo/base.json)"
ROUTER_FILES = ("router.safetensors", "router.json")  # a memory's router (demo/routers.sh), when it has one


def _copy_tokenizer(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copyfile(src / name, dst / name)


def _half(src: Path, dst: Path) -> int:
    """Save `src` as float16 safetensors in `dst` (config, weights, tokenizer); returns its parameter
    count."""
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32, use_safetensors=True)
    model = model.to(torch.float16)
    if dst.exists():
        shutil.rmtree(dst)
    model.save_pretrained(dst, safe_serialization=True)
    _copy_tokenizer(src, dst)
    return sum(p.numel() for p in model.parameters())


def _copy_router(work: Path, src: Path, dst: Path) -> bool:
    """The router files of memory `src` (if it has one) into `dst`, and its manifest entry into dst's manifest
    (work-dir paths made portable: `_strip_files`). False when `src` has none (dst is left as it is)."""
    entry = read_manifest(src).router if (src / "memdec.json").is_file() else None
    if not entry:
        return False
    for name in ROUTER_FILES:
        shutil.copyfile(src / name, dst / name)
        (dst / name).chmod(0o644)
    write_manifest(dst, read_manifest(dst).replace(router=_strip_files(entry, work)))
    config = read_json(dst / "router.json")
    (dst / "router.json").write_text(json.dumps(_strip_files(config, work), indent=2) + "\n",
                                     encoding="utf-8")
    return True


def _strip_files(value: Any, work: Path | None = None) -> Any:
    """A report without its `file` paths, and other paths into the recipe's work dir (a router's fold memory)
    relative to it: the work dir means nothing to a user of the shipped demo."""
    if isinstance(value, dict):
        return {k: _strip_files(v, work) for k, v in value.items() if k != "file"}
    if isinstance(value, list):
        return [_strip_files(v, work) for v in value]
    if (work is not None and isinstance(value, str) and Path(value).is_absolute()
            and Path(value).is_relative_to(work)):
        return str(Path(value).relative_to(work))
    return value


def _row(text: dict[str, Any], alpha: float) -> dict[str, Any]:
    """One text's numbers at the memory's α (and at the text's own best α)."""
    at = ppl_at(text, alpha)
    return {"source": text["label"], "tokens": text["tokens_scored"], "base_ppl": text["base_ppl"],
            "memory_ppl": text["memory_ppl"], "mixture_ppl": at,
            "change_pct": 100 * (at / text["base_ppl"] - 1),
            "best_alpha": text["best_alpha"], "best_ppl": text["best_ppl"]}


@dataclass(frozen=True)
class _Domain:
    """What the recipe left for one domain, read once: the shipped memory's manifest (its α and its
    evaluation on the base) and the leave-one-source-out reports."""

    name: str
    domain: str
    manifest: Manifest
    folds: list[dict[str, Any]]

    @classmethod
    def read(cls, work: Path, name: str, domain: str) -> _Domain:
        folds = [read_json(p) for p in sorted((work / "loso" / domain).glob("without-*/evaluation.json"))]
        return cls(name, domain, read_manifest(work / "memories" / name), folds)


def _domain_results(work: Path, d: _Domain) -> dict[str, Any]:
    """Cross-source (each leave-one-source-out memory on the source it never saw, at the domain's α) and
    in-source (the shipped memory on each of its sources) numbers of one domain."""
    domain, alpha = d.domain, d.manifest.alpha
    cross, fold_in = [], []
    for rep in d.folds:
        for t in (t for t in rep["texts"] if t["kind"] == CROSS_SOURCE):
            # The α check: the same memory on fresh text of the source it never saw (its train lines).
            check = read_json(work / "eval-alpha-check" / f"{domain}-{t['label']}"
                              / "evaluation.json")["texts"][0]
            cross.append({**_row(t, alpha), "fresh_text": _row(check, alpha)})
        fold_in += [_row(t, alpha) for t in rep["texts"] if t["kind"] == IN_SOURCE]
    return {
        "domain": domain,
        "alpha": alpha,
        "cross_source": cross,  # the held-out source of each leave-one-source-out memory
        "loso_in_source": fold_in,  # the same memories on their own source's valid text
        "in_source": [_row(t, alpha) for t in d.manifest.evaluation["texts"]],
    }


def _stage_times(work: Path) -> list[str]:
    """The recipe's `[time]` lines (seconds per stage), as it wrote them."""
    path = work / "times.txt"
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()] if path.is_file() else []


def _specificity(work: Path, name: str) -> list[dict[str, Any]]:
    rep = read_json(work / "eval-specificity" / name / "evaluation.json")
    return [_row(t, rep["alpha"]) for t in rep["texts"]]


def _plot(d: _Domain, path: Path) -> None:
    """Two panels on one axis (perplexity relative to the base alone): in-source, the shipped memory on each
    of its domain's sources; cross-source, each leave-one-source-out memory on the source it never saw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    domain, name, alpha = d.domain, d.name, d.manifest.alpha
    fig, (left, right) = plt.subplots(1, 2, figsize=(10.4, 3.9), dpi=100, sharey=True)
    for i, t in enumerate(d.manifest.evaluation["texts"]):
        a, p = relative_curve(t)
        left.plot(a, p, color=f"C{i}", marker="o", markersize=2.5, label=f"{t['label']}, base + {name}")
    for fold in d.folds:
        for t in (t for t in fold["texts"] if t["kind"] == CROSS_SOURCE):
            a, p = relative_curve(t)
            right.plot(a, p, marker="o", markersize=2.5, label=f"{t['label']} (memory never saw it)")
    for ax, title in ((left, f"in-source: {name} on {domain} valid.txt"),
                      (right, "cross-source: leave-one-source-out memories")):
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
        ax.axvline(alpha, color="red", linestyle=":", label=f"α = {alpha:.2f} (from held-out sources)")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(ScalarFormatter())
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("α (0 = base alone, 1 = memory alone)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    left.set_ylabel("perplexity / base perplexity")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--work", type=Path)
    p.add_argument("--dest", type=Path)
    p.add_argument("--half", type=Path, nargs=2, metavar=("SRC", "DST"),
                   help="only save SRC as float16 in DST")
    p.add_argument("--routers", action="store_true",
                   help="only copy the memories' routers (demo/routers.sh) into DEST's memories and "
                        "manifests")
    a = p.parse_args()
    if a.half:
        _half(*a.half)
        return
    if a.work is None or a.dest is None:
        p.error("--work and --dest are required")
    work, dest = a.work.resolve(), a.dest  # resolved: paths into it are made relative (`_strip_files`)
    if a.routers:
        for name in MEMORIES:
            if _copy_router(work, work / "memories" / name, dest / "memories" / name):
                print(f"router of {name} copied into {dest / 'memories' / name}")
        return
    dest.mkdir(parents=True, exist_ok=True)
    params: dict[str, int] = {}
    results: dict[str, Any] = {"parameters": params, "memories": {}, "specificity": {}, "general": {},
                               "stage_times": _stage_times(work)}
    (dest / "plots").mkdir(exist_ok=True)
    for name, domain in MEMORIES.items():
        d = _Domain.read(work, name, domain)
        params[name] = _half(work / "memories" / name, dest / "memories" / name)
        manifest = d.manifest
        results["memories"][name] = _domain_results(work, d)
        # The manifest keeps where its α came from: the held-out sources of the leave-one-source-out builds.
        evaluation = {**_strip_files(manifest.evaluation),
                      "leave_one_source_out": results["memories"][name]["cross_source"]}
        write_manifest(dest / "memories" / name,
                       manifest.replace(base_model=BASE_MODEL, evaluation=evaluation))
        _copy_router(work, work / "memories" / name, dest / "memories" / name)
        rows = _specificity(work, name)
        results["specificity"][name] = [r for r in rows if r["source"] != GENERAL]
        results["general"][name] = next(r for r in rows if r["source"] == GENERAL)
        _plot(d, dest / "plots" / f"{domain}.png")
    (dest / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (dest / "results.md").write_text(tables(results), encoding="utf-8")
    for top in ("memories", "plots", "results.json", "results.md"):
        for f in [dest / top, *(dest / top).rglob("*")]:
            f.chmod(0o755 if f.is_dir() else 0o644)  # transformers may write weights as 0600
    print(tables(results))


def _pct(x: float) -> str:
    return f"{x:+.1f}%".replace("-", "−")  # a real base moves by a few percent: one decimal


def tables(r: dict[str, Any]) -> str:
    """The results as Markdown: cross-source, in-source, specificity, general text, sizes."""
    out = ["### Cross-source: leave-one-source-out memories on the source they never saw", "",
           "| domain | held-out source | α | base | memory alone | base + memory at α | change "
           "| best α (ppl) | fresh text of the source: change at α, best α |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for m in r["memories"].values():
        for row in m["cross_source"]:
            fresh = row["fresh_text"]
            out.append(f"| {m['domain']} | {row['source']} | {m['alpha']:.2f} | {row['base_ppl']:.1f} "
                       f"| {row['memory_ppl']:.1f} | **{row['mixture_ppl']:.1f}** "
                       f"| {_pct(row['change_pct'])} | {row['best_alpha']:.2f} ({row['best_ppl']:.1f}) "
                       f"| {_pct(fresh['change_pct'])}, {fresh['best_alpha']:.2f} |")
    out += ["", "The same leave-one-source-out memories on their own source's valid text (in-source):", "",
            "| domain | source | base | memory alone | base + memory at α | change | best α |",
            "|---|---|---:|---:|---:|---:|---:|"]
    for m in r["memories"].values():
        for row in m["loso_in_source"]:
            out.append(f"| {m['domain']} | {row['source']} | {row['base_ppl']:.1f} | {row['memory_ppl']:.1f} "
                       f"| {row['mixture_ppl']:.1f} | {_pct(row['change_pct'])} | {row['best_alpha']:.2f} |")
    out += ["",
            "### In-source: the shipped memories (every source of their domain) on each source's valid text",
            "",
            "| memory | source | α | base | memory alone | base + memory | change | best α |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, m in r["memories"].items():
        for row in m["in_source"]:
            out.append(f"| {name} | {row['source']} | {m['alpha']:.2f} | {row['base_ppl']:.1f} "
                       f"| {row['memory_ppl']:.1f} | **{row['mixture_ppl']:.1f}** "
                       f"| {_pct(row['change_pct'])} | {row['best_alpha']:.2f} |")
    out += ["", "### Specificity: each shipped memory at its α on the other domains' valid.txt, "
                "and on general text",
            "", "| memory | text | base | base + memory at α | change |", "|---|---|---:|---:|---:|"]
    for name, rows in r["specificity"].items():
        for row in [*rows, r["general"][name]]:
            out.append(f"| {name} | {row['source']} | {row['base_ppl']:.1f} | {row['mixture_ppl']:.1f} "
                       f"| {_pct(row['change_pct'])} |")
    out += ["", "Parameters: " + ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in r["parameters"].items()) + "."]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
