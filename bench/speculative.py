"""Speculative mixing vs plain mixing vs the base alone, side by side on the demo models (the demo base,
SmolLM2-135M-Instruct from GGUF, and its memories).

    python -m bench.speculative [--batch 1,8] [--tokens 64] [--k 1,2,3,4,6] [--repeats 3]
                                [--memories biomed,legal,finance]

For each demo memory, at its manifest α and at α = 0.6, greedy and sampled (temperature 1), at each
batch size: decode tokens/s (prefill excluded) of the base alone, plain mixing (no speculation), and
speculative mixing with each fixed K and with adaptive K (up to the largest K; after one warm-up run of
the cell's workload, so it has measured its costs), all measured round-robin
in one run so load on a shared machine hits every configuration alike; the median of `--repeats` runs,
in tokens per CPU-second of the benchmark's process (wall-clock rates are in the JSON too).
Prompts are 32-token openings of held-out lines of the memory's domain
(`../shared/data/<domain>/valid.txt`; the synthetic `testkit` text when that is absent). Acceptance =
drafted tokens kept / drafted (the `memdec_spec_*` metrics' ratio; at K = 1 it is the per-token acceptance
β). Writes bench/results/speculative.json (`--name`).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter

import torch

from bench.common import DEMO, ROOT, demo_base_path, write_result
from memories.mixing import Mixture
from server.config import EngineConfig, ModelConfig
from server.engine import Engine
from server.loader import load_base
from server.registry import MemoryRegistry
from server.request import GenerationRequest, SamplingParams
from testkit.text import sample_text

DATA = ROOT.parent / "shared" / "data"
PROMPT_TOKENS = 32


class SpecCounts:
    """Engine observer: drafted / accepted tokens (the other hooks do nothing)."""

    def __init__(self) -> None:
        self.drafted = self.accepted = 0

    def on_speculation(self, memory: str, drafted: int, accepted: int) -> None:
        self.drafted += drafted
        self.accepted += accepted

    def __getattr__(self, name):
        return lambda *a, **k: None


def domain_prompts(tokenizer, domain: str, n: int) -> list[tuple[int, ...]]:
    path = DATA / domain / "valid.txt"
    lines = (path.read_text(encoding="utf-8").splitlines() if path.is_file()
             else sample_text(domain, 200_000).splitlines())
    out = []
    for line in lines:
        ids = tokenizer(line).input_ids
        if len(ids) >= PROMPT_TOKENS:
            out.append(tuple(ids[:PROMPT_TOKENS]))
        if len(out) == n:
            break
    return out


def watch_choices(engine: Engine) -> list[int]:
    """Record every k the engine's adaptive controller picks (the list grows as it runs)."""
    controller = engine.speculation
    assert controller is not None
    chosen: list[int] = []
    pick = controller.choose

    def recording(batch_size: int, betas: list[float]) -> int:
        k = pick(batch_size, betas)
        chosen.append(k)
        return k

    setattr(controller, "choose", recording)  # noqa: B010 - an instance attribute shadows the method
    return chosen


def decode_seconds(engine: Engine, prompts: list[tuple[int, ...]], tokens: int, memory: str | None,
                   alpha: float, temperature: float) -> tuple[float, float]:
    """(wall, CPU) seconds to decode `tokens` − 1 tokens per sequence after the prefill (which makes the
    first)."""
    for i, p in enumerate(prompts):
        params = SamplingParams(max_tokens=tokens, temperature=temperature, seed=i, ignore_eos=True)
        engine.add_request(GenerationRequest(f"r{i}", p, params, Mixture.single(memory, alpha)))
    engine.step()  # prefill
    t0, c0 = time.perf_counter(), time.process_time()
    while engine.has_unfinished():
        engine.step()
    return time.perf_counter() - t0, time.process_time() - c0


def bench_cell(engines: dict[str, Engine], counts: dict[str, SpecCounts], chosen: list[int],
               prompts: list[tuple[int, ...]], memory: str, alpha: float, temperature: float, tokens: int,
               repeats: int) -> dict:
    """One (memory, α, mode, batch) cell: every configuration `repeats` times, round-robin."""
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in engines}
    chosen.clear()
    kept: dict[str, list[tuple[int, int]]] = {name: [] for name in engines}
    # warm-up at this batch size; adaptive K learns this workload's costs
    for name, engine in engines.items():
        decode_seconds(engine, prompts, tokens if name == "adaptive" else 4,
                       None if name == "base" else memory, alpha, temperature)
    warmup = len(chosen)
    for _ in range(repeats):
        for name, engine in engines.items():
            c = counts[name]
            before = (c.drafted, c.accepted)
            runs[name].append(decode_seconds(engine, prompts, tokens, None if name == "base" else memory,
                                             alpha, temperature))
            kept[name].append((c.drafted - before[0], c.accepted - before[1]))
    generated = len(prompts) * (tokens - 1)
    # Per CPU-second of this process: on a machine shared with other jobs, wall time also counts their
    # load, which comes and goes between configurations; the wall-clock rates are kept alongside.
    tok_s = {name: generated / statistics.median(c for _, c in times) for name, times in runs.items()}
    wall_tok_s = {name: generated / statistics.median(w for w, _ in times) for name, times in runs.items()}
    acceptance = {name: sum(a for _, a in v) / max(1, sum(d for d, _ in v))
                  for name, v in kept.items() if name.startswith("K")}
    fixed = {name: rate for name, rate in tok_s.items() if name.startswith("K=")}
    best = max(fixed, key=lambda n: fixed[n])
    controller = engines["adaptive"].speculation
    assert controller is not None
    return {
        "tok_s": tok_s,
        "wall_tok_s": wall_tok_s,
        "adaptive_k_chosen": dict(sorted(Counter(chosen[warmup:]).items())),  # measured runs only
        "adaptive_step_ms": {k: round(s * 1e3, 2) for k, s in sorted(controller.costs(len(prompts)).items())},
        "acceptance": acceptance,
        "best_k": int(best.removeprefix("K=")),
        "spec_tok_s": fixed[best],
        "spec_over_plain": fixed[best] / tok_s["plain"],
        "spec_over_base": fixed[best] / tok_s["base"],
        "adaptive_over_plain": tok_s["adaptive"] / tok_s["plain"],
        "acceptance_at_best": acceptance[best],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--k", default="1,2,3,4,6",
                        help="fixed K values to compare (adaptive uses the largest)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memories", default="biomed,legal,finance")
    parser.add_argument("--name", default="speculative", help="result file bench/results/NAME.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    batches = [int(b) for b in args.batch.split(",")]
    ks = [int(k) for k in args.k.split(",")]
    base_path = demo_base_path()
    if base_path is None:
        raise SystemExit(2)
    base = load_base(ModelConfig(base_path))
    registry = MemoryRegistry(base)
    names = args.memories.split(",")
    for name in names:
        registry.load(name, str(DEMO / "memories" / name))
    counts = {name: SpecCounts() for name in ("base", "plain", *(f"K={k}" for k in ks), "adaptive")}

    def engine(name: str, k: int, adaptive: bool = False) -> Engine:
        config = EngineConfig(max_num_seqs=max(batches), speculative_tokens=k, speculative_adaptive=adaptive)
        return Engine(base, registry, config, observer=counts[name])

    engines = {"base": engine("base", 0), "plain": engine("plain", 0),
               **{f"K={k}": engine(f"K={k}", k) for k in ks},
               "adaptive": engine("adaptive", max(ks), adaptive=True)}
    chosen = watch_choices(engines["adaptive"])  # what adaptive K picks, per cell
    rows = []
    for name in names:
        info = registry.get(name)
        prompts = domain_prompts(base.tokenizer, info.domain, max(batches))
        for alpha in dict.fromkeys([info.alpha, 0.6]):
            for mode, temperature in (("greedy", 0.0), ("sampled", 1.0)):
                for batch in batches:
                    cell = bench_cell(engines, counts, chosen, prompts[:batch], name, alpha, temperature,
                                      args.tokens, args.repeats)
                    rows.append({"memory": name, "alpha": alpha, "mode": mode, "batch": batch, **cell})
                    print_row(rows[-1])
    path = write_result(args.name, {"tokens_per_sequence": args.tokens, "k": ks, "rows": rows})
    print(f"wrote {path}")


def print_row(r: dict) -> None:
    t = r["tok_s"]
    per_k = " ".join(f"{n}:{v:.0f}" for n, v in t.items() if n.startswith("K="))
    print(
        f"{r['memory']:>8} α={r['alpha']:.2f} {r['mode']:>7} B={r['batch']:<2} base {t['base']:7.1f}  "
        f"plain {t['plain']:7.1f}  "
        f"spec {r['spec_tok_s']:7.1f} (K={r['best_k']}, acc {r['acceptance_at_best']:.2f})  "
        f"adaptive {t['adaptive']:7.1f}  "
        f"spec/plain {r['spec_over_plain']:.2f}  spec/base {r['spec_over_base']:.2f}  [{per_k}]",
        flush=True,
    )


if __name__ == "__main__":
    main()
