"""Held-out perplexity of the base, the memory alone and their mixture over a grid of α.

Both models score the same tokens in the same sliding windows (the shared perplexity protocol), so
the mixture of token t is mix(log p_base(t), log p_mem(t), α) and every α costs no extra forward pass.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from memories.config import EvalConfig
from memories.jsonfile import write_json
from memories.manifest import read_manifest, write_manifest
from memories.mixing import mix_logprobs
from memories.models import context_length
from memories.perplexity import document_logprobs, window_settings

REPORT_JSON = "evaluation.json"
REPORT_PNG = "evaluation.png"


def _ppl(logprobs: torch.Tensor) -> float:
    return math.exp(-logprobs.double().mean().item())


def evaluate(
    base: torch.nn.Module,
    memory: torch.nn.Module,
    tokens: np.ndarray,
    vocab_size: int,
    config: EvalConfig = EvalConfig(),
    progress: bool = True,
) -> dict[str, Any]:
    """Perplexities and the best α on `tokens` (a held-out token stream)."""
    if not config.alphas or not all(0.0 < a < 1.0 for a in config.alphas):
        raise ValueError("alphas must be a non-empty list of values strictly between 0 and 1")
    context, stride = window_settings(
        min(context_length(base), context_length(memory)), config.context, config.stride, clamp=True
    )
    started = time.perf_counter()
    ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64))  # [N]
    base_lp, mem_lp = [], []
    bar = tqdm(total=len(ids) - 1, desc="evaluate", unit="tok", disable=not progress)
    for b_lp, m_lp in document_logprobs([base, memory], ids, context, stride, vocab_size):
        base_lp.append(b_lp.cpu())  # [B * S]
        mem_lp.append(m_lp.cpu())
        bar.update(b_lp.numel())
    bar.close()
    b, m = torch.cat(base_lp), torch.cat(mem_lp)  # [num_scored] each
    curve = [{"alpha": float(a), "ppl": _ppl(mix_logprobs(b, m, float(a)))} for a in config.alphas]
    best = min(curve, key=lambda r: r["ppl"])
    base_ppl = _ppl(b)
    return {
        "tokens": int(len(ids)),
        "tokens_scored": int(b.numel()),
        "context": context,
        "stride": stride,
        "base_ppl": base_ppl,
        "memory_ppl": _ppl(m),
        "mixture": curve,
        "best_alpha": best["alpha"],
        "best_ppl": best["ppl"],
        "improvement_pct": 100.0 * (base_ppl - best["ppl"]) / base_ppl,
        "seconds": round(time.perf_counter() - started, 2),
    }


def plot_report(report: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """Perplexity vs α. A one-text report: its curve, the base as a horizontal line, the memory alone at
    α = 1. A multi-text report (`memories.crosseval.combine`): in-source and cross-source texts side by
    side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "texts" in report:
        fig = _plot_texts(plt, report, title)
    else:
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
        _plot_one(ax, report, title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def alpha_curve(report: dict[str, Any]) -> tuple[list[float], list[float]]:
    """α from 0 (the base alone) to 1 (the memory alone) and the perplexity at each."""
    alphas = [0.0] + [r["alpha"] for r in report["mixture"]] + [1.0]
    return alphas, [report["base_ppl"]] + [r["ppl"] for r in report["mixture"]] + [report["memory_ppl"]]


def relative_curve(report: dict[str, Any]) -> tuple[list[float], list[float]]:
    """The α curve with perplexity divided by the base's: 1 is the base alone, whatever the text's
    difficulty."""
    alphas, ppls = alpha_curve(report)
    return alphas, [p / report["base_ppl"] for p in ppls]


def _plot_one(ax: Any, report: dict[str, Any], title: str) -> None:
    alphas, ppls = alpha_curve(report)
    ax.plot(alphas, ppls, marker="o", markersize=3, label="mixture α·p_mem + (1−α)·p_base")
    ax.axhline(report["base_ppl"], color="grey", linestyle="--",
               label=f"base alone ({report['base_ppl']:.2f})")
    ax.scatter([report["best_alpha"]], [report["best_ppl"]], color="red", zorder=3,
               label=f"best α = {report['best_alpha']:.2f} ({report['best_ppl']:.2f})")
    ax.scatter([1.0], [report["memory_ppl"]], color="black", marker="s", zorder=3,
               label=f"memory alone ({report['memory_ppl']:.2f})")
    ax.set_xlabel("α (weight of the memory)")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.set_title(title or f"held-out perplexity, {report['tokens_scored']} tokens")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)


def _plot_texts(plt: Any, report: dict[str, Any], title: str) -> Any:
    """One panel per kind (in-source, cross-source), each text's perplexity relative to its base alone, so
    texts of different difficulty share an axis; the recommended α is a vertical line in both."""
    from matplotlib.ticker import ScalarFormatter

    from memories.crosseval import KINDS

    kinds = [k for k in KINDS if any(t["kind"] == k for t in report["texts"])]
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.2 * len(kinds), 4.0), dpi=110, sharey=True,
                             squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        for t in (t for t in report["texts"] if t["kind"] == kind):
            ax.plot(*relative_curve(t), marker="o", markersize=3,
                    label=f"{t['label']} (base {t['base_ppl']:.0f}, best α {t['best_alpha']:.2f})")
        ax.axhline(1.0, color="grey", linestyle="--", label="base alone")
        ax.axvline(report["alpha"], color="red", linestyle=":",
                   label=f"α = {report['alpha']:.2f} ({report['alpha_from']})")
        ax.set_title(f"{kind} text" + (" (α chosen here)" if report["alpha_from"] == kind else ""),
                     fontsize=10)
        ax.set_xlabel("α (0 = base alone, 1 = memory alone)")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())  # 0.8, 1, 2 rather than 8×10⁻¹
        ax.yaxis.set_minor_formatter(ScalarFormatter())
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("perplexity / base perplexity")
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def write_report(report: dict[str, Any], out_dir: str | Path, title: str = "") -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = write_json(out_dir / REPORT_JSON, report)
    return json_path, plot_report(report, out_dir / REPORT_PNG, title)


def update_manifest(memory_dir: str | Path, report: dict[str, Any]) -> None:
    """Record the recommended α (a multi-text report's `alpha`, else the best α) and the numbers in the
    manifest."""
    manifest = read_manifest(memory_dir)
    write_manifest(memory_dir, manifest.replace(alpha=recommended_alpha(report), evaluation=report))


def recommended_alpha(report: dict[str, Any]) -> float:
    return float(report.get("alpha", report["best_alpha"]))
