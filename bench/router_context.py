"""Offline experiment (not served): would a context signal help the router?

Adds two features to the router's eight: exponential moving averages (decay 0.9 and 0.99) of the memory's
advantage log p_mem(y) − log p_base(y) over the tokens *before* each position (at serving time those are the
prompt and the tokens already emitted, so the signal is causal). Fits and evaluates exactly as
`memdec memory router` does (same windows, 80/20 fit/select split of the fitting text, same candidates), and
prints one line per evaluation text. The server does not compute these features (it would need per-row state
through prefill, prefix caching and preemption), so such a router cannot be saved or served yet.

    python bench/router_context.py MEMORY BASE LABEL=FIT_TEXT [LABEL=EVAL_TEXT ...]
"""

from __future__ import annotations

import dataclasses
import sys

import torch

from memories.corpus import tokenize_corpus
from memories.manifest import read_manifest
from memories.models import load_causal_lm
from memories.router import FEATURES
from memories.router_fit import FitConfig, Scored, evaluate_router, fit_router, score_text
from memories.stages import Base

DECAYS = (0.9, 0.99)
FIT_TOKENS, EVAL_TOKENS = 60000, 20000


def ema_before(d: torch.Tensor, decay: float) -> torch.Tensor:
    """e[i] = Σ_{s<i} (1 − decay)·decay^(i−1−s)·d[s]: the average of what came before position i."""
    out = torch.zeros_like(d)
    acc = 0.0
    for i, v in enumerate(d.tolist()):
        out[i] = acc
        acc = decay * acc + (1 - decay) * v
    return out


def with_context(s: Scored) -> Scored:
    d = s.memory - s.base  # the memory's advantage on each actual token, in text order
    return dataclasses.replace(s, x=torch.cat([s.x, *(ema_before(d, k)[:, None] for k in DECAYS)], dim=1))


def main(memory: str, base_dir: str, fit_spec: str, *eval_specs: str) -> None:
    base = Base(base_dir, "cpu", "auto")
    manifest = read_manifest(memory)
    mem = load_causal_lm(memory, base.device, base.dtype)

    def scored(spec: str, max_tokens: int) -> Scored:
        label, path = spec.split("=", 1)
        tokens, _ = tokenize_corpus(base.tokenizer, path, max_tokens, progress=False)
        return with_context(score_text(base.model, mem, tokens, len(base.tokenizer), label, progress=False))

    names = FEATURES + tuple(f"advantage_ema_{k}" for k in DECAYS)
    router, sel = fit_router([scored(fit_spec, FIT_TOKENS)], manifest.alpha, FitConfig(), False, names)
    print(f"selection split: router {sel['select_router_ppl']:.2f}, best fixed α {sel['select_best_fixed_alpha']:.2f} "
          f"{sel['select_best_fixed_ppl']:.2f} (hidden {sel['chosen_hidden']})")
    grid = tuple(round(0.05 * i, 2) for i in range(1, 20))
    for spec in eval_specs:
        t = evaluate_router(router, scored(spec, EVAL_TOKENS), grid, manifest.alpha)
        print(f"{t['label']:<24} base {t['base_ppl']:7.1f}  best α {t['best_alpha']:.2f} {t['best_ppl']:7.1f}  "
              f"recommended {t['recommended_ppl']:7.1f}  router {t['router_ppl']:7.1f} (mean α {t['router_mean_alpha']:.2f})  "
              f"×best {t['router_vs_best']:.3f}  ×recommended {t['router_vs_recommended']:.3f}", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
