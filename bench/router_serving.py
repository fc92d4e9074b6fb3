"""Does the engine's `/v1/perplexity` path reproduce the toolkit's router evaluation? Serves a memory with its
router through the engine (`"alpha": "auto"`, the toolkit's windows: context 512, stride 256) on the first
20,000 tokens of an evaluation text, and compares the mean NLL with the toolkit's `router_nll` for that text
in the router's evaluation report (`memdec memory router --report-dir`).

    python -m bench.router_serving MEMORY BASE TEXT LABEL REPORT
    # e.g. $W/loso/biomedical/without-medquad $W/base-f16 $W/data/biomedical/train/medquad.txt medquad-train \
    #      $W/routers/biomedical-without-medquad/router-evaluation.json
"""

from __future__ import annotations

import json
import math
import sys

from memories.corpus import tokenize_corpus
from memories.mixing import Mixture
from server.config import EngineConfig, ModelConfig
from server.engine import Engine
from server.loader import load_base
from server.registry import MemoryRegistry
from server.request import PerplexityRequest


def main(memory: str, base_dir: str, text: str, label: str, report: str) -> None:
    base = load_base(ModelConfig(base_dir))
    registry = MemoryRegistry(base)
    registry.load("m", memory)
    tokens, _ = tokenize_corpus(base.tokenizer, text, 20000, progress=False)
    engine = Engine(base, registry, EngineConfig())
    engine.add_perplexity(PerplexityRequest("p", (tuple(int(t) for t in tokens),), (Mixture.auto("m"),),
                                            context_length=512, stride=256))
    while not (result := engine.step()).jobs:
        pass
    served = result.jobs[0].result.documents[0].mixed[0].mean_nll
    with open(report, encoding="utf-8") as f:
        want = next(t for t in json.load(f)["texts"] if t["label"] == label)
    print(f"{label}: served nll {served:.6f} (ppl {math.exp(served):.2f}), "
          f"toolkit router_nll {want['router_nll']:.6f} "
          f"(ppl {want['router_ppl']:.2f}), |diff| {abs(served - want['router_nll']):.2e}")


if __name__ == "__main__":
    main(*sys.argv[1:6])
