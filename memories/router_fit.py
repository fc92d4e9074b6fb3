"""Fit a memory's router on held-out text, judge it against every fixed α, plot it, save it
(`memdec memory router`).

A router is only as good as the text it is fitted on: on text from the memory's own datastore sources the
memory looks far better than it is, and the router learns α ≈ 1 (measured for issue 17: 13% and 63% worse than
the best fixed α on other sources). So the fitting text must come from sources the memory's datastore never
saw; `source_warnings` refuses text the manifest records as in-source and warns when it cannot tell.

Both models score each text once, in the paper's sliding windows (the same windows as `memories.evaluate` and
`/v1/perplexity`); what is kept per position is the router's features and both models' log-probs of the actual
next token, which is all the objective −log(α_t·p_mem(y) + (1 − α_t)·p_base(y)) needs. The last
`SELECT_FRACTION` of each fitting text (contiguous, so mostly other documents) chooses among the candidate
routers and stops their training; the evaluation texts are never used for either.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from memories.config import EvalConfig
from memories.crosseval import IN_SOURCE
from memories.mixing import mix_logprobs
from memories.models import context_length
from memories.perplexity import (
    BATCH_LOGITS,
    BATCH_TOKENS,
    batch_distributions,
    sliding_windows,
    window_batches,
    window_settings,
)
from memories.router import (
    DEFAULT_CONTEXT_DECAYS,
    Router,
    RouterConfig,
    advantage_emas,
    features,
    mixture_nll,
)

REPORT_JSON = "router-evaluation.json"
REPORT_PNG = "router-evaluation.png"
SELECT_FRACTION = 0.2
HIDDEN_CANDIDATES = (0, 16)  # logistic regression and a one-hidden-layer MLP; the held-out split picks
# full-batch Adam steps at most (a 2000-step cap fitted the held-out split better but transferred worse:
# docs/demo.md)
MAX_STEPS = 400
EVAL_EVERY = 10
PATIENCE = 8  # evaluations without improvement before a candidate stops


@dataclass(frozen=True)
class Scored:
    """One text scored by both models: per position (in text order), the router's distribution features [N, 8]
    and the targets' log-probs [N]. The context features are computed from the latter (`router_inputs`)."""

    label: str
    x: torch.Tensor
    base: torch.Tensor
    memory: torch.Tensor
    context: int
    stride: int


@dataclass(frozen=True)
class FitConfig:
    hidden: tuple[int, ...] = HIDDEN_CANDIDATES
    lr: float = 1e-2
    max_steps: int = MAX_STEPS
    select_fraction: float = SELECT_FRACTION
    seed: int = 0
    context_decays: tuple[float, ...] = DEFAULT_CONTEXT_DECAYS  # () fits an 8-feature router (--no-context)


def router_inputs(s: Scored, decays: tuple[float, ...]) -> torch.Tensor:
    """[N, 8 + K] what a router with these context decays reads at each position of a scored text: the
    distribution features and the memory's advantage EMAs over the text's preceding positions."""
    if not decays:
        return s.x
    return torch.cat([s.x, advantage_emas(s.memory - s.base, decays)[0]], dim=-1)


@torch.inference_mode()
def score_text(
    base: torch.nn.Module, memory: torch.nn.Module, tokens: np.ndarray, vocab_size: int, label: str,
    config: EvalConfig = EvalConfig(), temperature: float = 1.0, progress: bool = True,
) -> Scored:
    """Both models' log-distributions in the protocol's windows, reduced to features and target log-probs."""
    context, stride = window_settings(min(context_length(base), context_length(memory)), config.context,
                                      config.stride, clamp=True)
    device = next(base.parameters()).device
    ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64)).to(device)
    xs, bs, ms = [], [], []
    bar = tqdm(total=max(len(ids) - 1, 0), desc=f"score {label}", unit="tok", disable=not progress)
    windows = sliding_windows(len(ids), context, stride)
    for batch in window_batches(windows, BATCH_TOKENS, BATCH_LOGITS // 4, vocab_size):
        b = batch_distributions(base, ids, batch, vocab_size)  # [B, S, V]
        m = batch_distributions(memory, ids, batch, vocab_size, temperature).to(b.device)
        targets = torch.stack([ids[w.score_from : w.end] for w in batch]).unsqueeze(-1)  # [B, S, 1]
        xs.append(features(b, m).flatten(0, 1).cpu())
        bs.append(b.gather(-1, targets).flatten().cpu())
        ms.append(m.gather(-1, targets).flatten().cpu())
        bar.update(bs[-1].numel())
    bar.close()
    return Scored(label, torch.cat(xs), torch.cat(bs), torch.cat(ms), context, stride)


def _split(texts: Sequence[Scored], fraction: float) -> tuple[Scored, Scored]:
    """(fit, select): each text's first 1 − fraction of positions, and its last fraction."""
    def part(keep_first: bool) -> Scored:
        parts = []
        for t in texts:
            cut = int(round(len(t.base) * (1 - fraction)))
            s = slice(0, cut) if keep_first else slice(cut, None)
            parts.append((t.x[s], t.base[s], t.memory[s]))
        x, b, m = (torch.cat(p) for p in zip(*parts, strict=True))
        return Scored("+".join(t.label for t in texts), x, b, m, texts[0].context, texts[0].stride)

    return part(True), part(False)


def _nll(router: Router, s: Scored) -> float:
    with torch.no_grad():
        return float(mixture_nll(router.logit(s.x), s.base, s.memory))


def fixed_nll(s: Scored, alpha: float) -> float:
    return float(-mix_logprobs(s.base, s.memory, alpha).double().mean())


def fit_router(
    texts: Sequence[Scored], start_alpha: float, config: FitConfig = FitConfig(), progress: bool = True,
) -> tuple[Router, dict[str, Any]]:
    """The candidate router with the lowest mixture NLL on the held-out split of the fitting texts, and a
    summary (each candidate's numbers, and the best fixed α's on the same split for comparison). The context
    features are computed over each whole text before it is split (they only look back)."""
    decays = config.context_decays
    texts = [dataclasses.replace(t, x=router_inputs(t, decays)) for t in texts]
    fit, select = _split(texts, config.select_fraction)
    mean, std = fit.x.mean(0), fit.x.std(0).clamp_min(1e-3)
    candidates: list[dict[str, Any]] = []
    for hidden in config.hidden:
        torch.manual_seed(config.seed)
        router = Router(RouterConfig.with_context(decays, hidden=hidden))
        router.mean.copy_(mean)
        router.std.copy_(std)
        # the fixed α the toolkit recommends: the router departs only where it helps
        router.start_at(start_alpha)
        opt = torch.optim.Adam(router.net.parameters(), lr=config.lr)
        best, best_state, since, step = _nll(router, select), None, 0, 0
        started = _nll(router, select)
        bar = tqdm(total=config.max_steps, desc=f"fit hidden={hidden}", disable=not progress)
        for step in range(1, config.max_steps + 1):
            opt.zero_grad()
            loss = mixture_nll(router.logit(fit.x), fit.base, fit.memory)
            loss.backward()
            opt.step()
            bar.update(1)
            if step % EVAL_EVERY == 0:
                held = _nll(router, select)
                bar.set_postfix(fit=f"{loss.item():.4f}", held_out=f"{held:.4f}")
                if held < best - 1e-6:
                    best, since = held, 0
                    best_state = {k: v.clone() for k, v in router.state_dict().items()}
                else:
                    since += 1
                    if since >= PATIENCE:
                        break
        bar.close()
        if best_state is not None:
            router.load_state_dict(best_state)
        candidates.append({"hidden": hidden, "steps": step, "held_out_nll_start": started,
                           "held_out_nll": best, "router": router})
    chosen = min(candidates, key=lambda c: c["held_out_nll"])
    grid = [round(a, 2) for a in np.arange(0.05, 1.0, 0.05)]
    fixed = min(((a, fixed_nll(select, a)) for a in grid), key=lambda t: t[1])
    summary = {
        "positions_fit": len(fit.base),
        "positions_select": len(select.base),
        "candidates": [{k: v for k, v in c.items() if k != "router"} for c in candidates],
        "chosen_hidden": chosen["hidden"],
        "select_router_ppl": math.exp(chosen["held_out_nll"]),
        "select_best_fixed_alpha": fixed[0],
        "select_best_fixed_ppl": math.exp(fixed[1]),
        "select_start_alpha_ppl": math.exp(fixed_nll(select, start_alpha)),
    }
    router = chosen["router"]
    router.config = RouterConfig.with_context(decays, hidden=chosen["hidden"], fitted=router.config.fitted)
    return router.eval().requires_grad_(False), summary


def evaluate_router(router: Router, s: Scored, alphas: Sequence[float], recommended: float) -> dict[str, Any]:
    """One text: base, memory alone, each fixed α of the grid, the recommended α, and the router."""
    with torch.no_grad():
        z = router.logit(router_inputs(s, router.context_decays))
        router_nll = float(mixture_nll(z, s.base, s.memory))
        mean_alpha = float(torch.sigmoid(z).mean())
    curve = [{"alpha": float(a), "ppl": math.exp(fixed_nll(s, a))} for a in alphas]
    best = min(curve, key=lambda r: r["ppl"])
    rep: dict[str, Any] = {
        "label": s.label,
        "tokens_scored": len(s.base),
        "context": s.context,
        "stride": s.stride,
        "base_ppl": math.exp(float(-s.base.double().mean())),
        "memory_ppl": math.exp(float(-s.memory.double().mean())),
        "mixture": curve,
        "best_alpha": best["alpha"],
        "best_ppl": best["ppl"],
        "recommended_alpha": recommended,
        "recommended_ppl": math.exp(fixed_nll(s, recommended)),
        "router_nll": router_nll,
        "router_ppl": math.exp(router_nll),
        "router_mean_alpha": mean_alpha,
    }
    rep["router_vs_best"] = rep["router_ppl"] / rep["best_ppl"]
    rep["router_vs_recommended"] = rep["router_ppl"] / rep["recommended_ppl"]
    return rep


def source_warnings(manifest: Any, labels: Sequence[tuple[str, str]], allow_in_source: bool) -> list[str]:
    """Refuse (ValueError) fitting text the manifest records as one of the datastore's sources; warn when the
    manifest cannot tell. `labels`: (label, resolved path) of each fitting text."""
    evaluation = manifest.evaluation or {}
    in_source = {t.get("label") for t in evaluation.get("texts", []) if t.get("kind") == IN_SOURCE}
    in_files = {str(Path(t["file"]).resolve()) for t in evaluation.get("texts", [])
                if t.get("kind") == IN_SOURCE and t.get("file")}
    held = set((manifest.corpus or {}).get("holdout_sources", []))
    out = []
    for label, path in labels:
        shared = label in in_source or path in in_files
        if shared and not allow_in_source:
            raise ValueError(
                f"fitting text {label!r} ({path}) comes from a source of this memory's datastore: the memory "
                "memorised it, and a router fitted there learns to trust the memory everywhere (α ≈ 1). Fit "
                "on a source the datastore never saw (a leave-one-source-out build: --holdout-source), or "
                "pass --allow-in-source to do it anyway")
        if shared:
            out.append(f"WARNING: fitting on {label!r}, a source of the memory's datastore "
                       "(--allow-in-source): expect α ≈ 1 and a router worse than a fixed α on other text")
        elif label not in held:
            out.append(f"WARNING: the manifest does not say that {label!r} was held out of the datastore "
                       f"(held-out sources: {sorted(held) or 'none'}); if the memory saw this text, the "
                       "router will trust it too much")
    return out


def plot_router(report: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """One panel per evaluation text: perplexity / base over α (0 = base, 1 = memory), the router as a
    line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from memories.evaluate import relative_curve

    texts = report["texts"]
    fig, axes = plt.subplots(1, len(texts), figsize=(4.6 * len(texts), 3.8), dpi=110, squeeze=False,
                             sharey=True)
    for ax, t in zip(axes[0], texts, strict=True):
        ax.plot(*relative_curve(t), marker="o", markersize=3, label="fixed α")
        ax.axhline(1.0, color="grey", linestyle="--", label="base alone")
        ax.axhline(t["router_ppl"] / t["base_ppl"], color="red",
                   label=f"router (mean α {t['router_mean_alpha']:.2f}): ×{t['router_vs_best']:.3f} best α")
        ax.axvline(t["recommended_alpha"], color="black", linestyle=":",
                   label=f"recommended α {t['recommended_alpha']:.2f}")
        ax.set_title(f"{t['label']} ({t['tokens_scored']} tokens)", fontsize=9)
        ax.set_xlabel("α (0 = base, 1 = memory)")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("perplexity / base perplexity")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


@dataclass(frozen=True)
class RouterJob:
    """What `memdec memory router` was asked to do."""

    memory: Path
    base: str
    texts: tuple[tuple[str, str], ...]  # (label, path) fitting texts
    # (label, path) evaluation texts, never used for fitting or selection
    eval_texts: tuple[tuple[str, str], ...]
    from_dir: Path | None = None  # take this memory's router instead of fitting one
    max_tokens: int | None = None  # per fitting text
    eval: EvalConfig = EvalConfig()
    fit: FitConfig = FitConfig()
    allow_in_source: bool = False
    report_dir: Path | None = None
    device: str = "auto"
    dtype: str = "auto"


def run(job: RouterJob, progress: bool = True) -> dict[str, Any]:
    """Fit (or copy) the router, evaluate it, save it into the memory and its manifest; returns the report."""
    from memories.corpus import tokenize_corpus
    from memories.jsonfile import write_json
    from memories.manifest import read_manifest, write_manifest
    from memories.models import load_causal_lm
    from memories.router import load_router, save_router
    from memories.stages import Base

    started = time.perf_counter()
    manifest = read_manifest(job.memory)
    base = Base(job.base, job.device, job.dtype)
    base.check_tokenizer_of(job.memory)
    warnings: list[str] = []
    if job.from_dir is None:
        if not job.texts:
            raise ValueError("give at least one --text to fit on (or --from a memory whose router to take)")
        warnings = source_warnings(manifest, [(lab, str(Path(p).resolve())) for lab, p in job.texts],
                                   job.allow_in_source)
        for w in warnings:
            print(f"[memdec] {w}", flush=True)
    mem_model = load_causal_lm(job.memory, base.device, base.dtype)
    vocab = len(base.tokenizer)
    # The fixed α the router starts from and is compared with: --alpha when given, else the manifest's.
    alpha = job.eval.alpha if job.eval.alpha is not None else manifest.alpha

    def scored(label: str, path: str, max_tokens: int | None) -> Scored:
        tokens, _ = tokenize_corpus(base.tokenizer, path, max_tokens, progress=False)
        return score_text(base.model, mem_model, tokens, vocab, label, job.eval, manifest.temperature,
                          progress)

    if job.from_dir is not None:
        source = read_manifest(job.from_dir)
        if not source.router:
            raise ValueError(f"{job.from_dir} has no router to take")
        router = load_router(job.from_dir, source.router)
        fitted = {**router.config.fitted, "taken_from": str(job.from_dir)}
    else:
        fit_texts = [scored(lab, p, job.max_tokens) for lab, p in job.texts]
        router, selection = fit_router(fit_texts, alpha, job.fit, progress)
        fitted = {"memory": str(job.memory),
                  "texts": [{"label": lab, "file": str(Path(p).resolve()), "tokens": len(s.base)}
                            for (lab, p), s in zip(job.texts, fit_texts, strict=True)],
                  "start_alpha": alpha, "selection": selection}
    router.config = RouterConfig.with_context(router.context_decays, hidden=router.config.hidden,
                                              fitted=fitted)
    evals = [evaluate_router(router, scored(lab, p, job.eval.max_tokens), job.eval.alphas, alpha)
             for lab, p in job.eval_texts]
    report = {"memory": manifest.name, "domain": manifest.domain, "hidden": router.config.hidden,
              "context_decays": list(router.context_decays),
              "fitted": fitted, "texts": evals, "warnings": warnings,
              "seconds": round(time.perf_counter() - started, 1)}
    entry = save_router(router, job.memory)
    brief = [{k: t[k] for k in ("label", "tokens_scored", "base_ppl", "best_alpha", "best_ppl",
                                "recommended_alpha", "recommended_ppl", "router_ppl", "router_mean_alpha",
                                "router_vs_best")}
             for t in evals]
    write_manifest(job.memory, read_manifest(job.memory).replace(router={**entry, "evaluation": brief}))
    report_dir = Path(job.report_dir or job.memory)
    report_dir.mkdir(parents=True, exist_ok=True)
    write_json(report_dir / REPORT_JSON, report)
    if evals:
        plot_router(report, report_dir / REPORT_PNG, f"{manifest.name}: router vs fixed α on held-out text")
    return report
