"""In-source vs cross-source evaluation: which α to recommend, and when to warn.

A memory is scored on several held-out texts, each either *in-source* (its source also fed the datastore)
or *cross-source* (from a source the datastore never saw). In-source text flatters a memory that memorised
its datastore, so α is recommended from cross-source texts only; in-source text is reported beside it, and
a disagreement between the two is the sign of memorisation this module warns about.

Pure functions over `memories.evaluate.evaluate` reports (no models), so the rules are tested on numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

IN_SOURCE = "in-source"
CROSS_SOURCE = "cross-source"
KINDS = (IN_SOURCE, CROSS_SOURCE)

# Warning thresholds. The α grid is 0.05 apart; two curves whose best α differ by more than this are not
# the same curve read with noise.
ALPHA_DISAGREEMENT = 0.2
# In-source gain this many times the cross-source gain (both as % below the base): memorisation, not domain.
# Gains under MIN_GAIN_PCT are noise at the grid's resolution, not a sign of anything.
GAIN_RATIO = 2.0
MIN_GAIN_PCT = 10.0


@dataclass(frozen=True)
class Text:
    """One evaluation text: a label (its source, or the file's stem), its file and its kind."""

    label: str
    path: str
    kind: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"text kind must be one of {KINDS}, got {self.kind!r}")


def pooled(reports: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Several texts as one curve: per α, the geometric mean of their perplexities, so that each text
    (each source) weighs the same however many tokens it has."""
    if not reports:
        raise ValueError("nothing to pool")

    def gmean(values: Sequence[float]) -> float:
        return math.exp(sum(math.log(v) for v in values) / len(values))

    alphas = [r["alpha"] for r in reports[0]["mixture"]]
    if any([r["alpha"] for r in rep["mixture"]] != alphas for rep in reports):
        raise ValueError("the reports were made on different α grids")
    curve = [{"alpha": a, "ppl": gmean([rep["mixture"][i]["ppl"] for rep in reports])}
             for i, a in enumerate(alphas)]
    best = min(curve, key=lambda r: r["ppl"])
    base = gmean([rep["base_ppl"] for rep in reports])
    return {
        "texts": len(reports),
        "tokens_scored": sum(rep["tokens_scored"] for rep in reports),
        "base_ppl": base,
        "memory_ppl": gmean([rep["memory_ppl"] for rep in reports]),
        "mixture": curve,
        "best_alpha": best["alpha"],
        "best_ppl": best["ppl"],
        "improvement_pct": 100.0 * (base - best["ppl"]) / base,
    }


def ppl_at(report: dict[str, Any], alpha: float) -> float:
    """The mixture's perplexity at the grid point nearest to α."""
    return float(min(report["mixture"], key=lambda r: abs(r["alpha"] - alpha))["ppl"])


def recommend(groups: dict[str, dict[str, Any]], fixed_alpha: float | None = None) -> tuple[float, str]:
    """(α, where it came from): a fixed α when given; else the best α of the cross-source texts; else, with
    no cross-source text at all, the best in-source α (flagged by `warnings`)."""
    if fixed_alpha is not None:
        return float(fixed_alpha), "fixed"
    for kind in (CROSS_SOURCE, IN_SOURCE):
        if kind in groups:
            return float(groups[kind]["best_alpha"]), kind
    raise ValueError("no evaluation text")


def warnings(
    texts: Sequence[dict[str, Any]], groups: dict[str, dict[str, Any]], alpha: float, alpha_from: str
) -> list[str]:
    """Plain-English warnings: memorisation signs, and a mixture worse than the base where it matters."""
    out: list[str] = []
    cross, inside = groups.get(CROSS_SOURCE), groups.get(IN_SOURCE)
    if cross is None:
        out.append("no cross-source text: the memory was only judged on text from its datastore's sources, "
                   "where memorising them looks like learning the domain (hold a source out: "
                   "--holdout-source)")
    if alpha_from == IN_SOURCE:
        out.append(f"α = {alpha:.2f} was chosen on in-source text; it may be too high for text from "
                   "other sources")
    for t in texts:
        if t["kind"] == CROSS_SOURCE and ppl_at(t, alpha) > t["base_ppl"]:
            out.append(f"{t['label']} (cross-source): the mixture at α = {alpha:.2f} is worse than the base "
                       f"({ppl_at(t, alpha):.1f} vs {t['base_ppl']:.1f})")
    if cross is not None and inside is not None:
        if abs(cross["best_alpha"] - inside["best_alpha"]) > ALPHA_DISAGREEMENT + 1e-9:
            out.append(f"best α differs between in-source ({inside['best_alpha']:.2f}) and cross-source "
                       f"({cross['best_alpha']:.2f}) text: the memory may have memorised its sources")
        gain_in, gain_cross = inside["improvement_pct"], cross["improvement_pct"]
        if gain_in >= MIN_GAIN_PCT and gain_in > GAIN_RATIO * max(gain_cross, 0.0):
            out.append(f"the memory gains {gain_in:.0f}% in-source but {gain_cross:.0f}% cross-source: "
                       "it may have memorised its sources rather than learned the domain")
    return out


def alpha_from_builds(reports: Sequence[dict[str, Any]]) -> float:
    """α for a memory built from every source, read off the leave-one-source-out builds of the same recipe:
    the best α of their cross-source curves pooled (each held-out source weighs the same). Those builds
    saw no text of the source they are judged on, which the all-source memory cannot offer."""
    groups = [r["groups"][CROSS_SOURCE] for r in reports if CROSS_SOURCE in r.get("groups", {})]
    if len(groups) != len(reports):
        raise ValueError("every report must come from a build with a held-out source (--holdout-source)")
    return float(pooled(groups)["best_alpha"])


def combine(texts: Sequence[dict[str, Any]], fixed_alpha: float | None = None) -> dict[str, Any]:
    """The report of a multi-text evaluation. `texts` are `evaluate` reports with `label`, `kind` and `file`.

    Its top-level base_ppl, memory_ppl, mixture, best_alpha, best_ppl, improvement_pct and tokens_scored are
    those of the pooled group α was chosen from (as a one-text report has them), so older readers still
    work."""
    groups = {kind: pooled([t for t in texts if t["kind"] == kind]) for kind in KINDS
              if any(t["kind"] == kind for t in texts)}
    alpha, alpha_from = recommend(groups, fixed_alpha)
    main = groups[CROSS_SOURCE] if CROSS_SOURCE in groups else groups[IN_SOURCE]
    return {
        **{k: main[k] for k in ("tokens_scored", "base_ppl", "memory_ppl", "mixture", "best_alpha",
                                 "best_ppl", "improvement_pct")},
        "alpha": alpha,
        "alpha_from": alpha_from,
        "ppl_at_alpha": {t["label"]: ppl_at(t, alpha) for t in texts},
        "groups": groups,
        "texts": list(texts),
        "warnings": warnings(texts, groups, alpha, alpha_from),
        "context": texts[0]["context"],
        "stride": texts[0]["stride"],
        "seconds": round(sum(t["seconds"] for t in texts), 2),
    }
