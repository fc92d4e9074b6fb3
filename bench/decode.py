"""Decode speed: base alone vs base + memory, against the floor of running both models' forwards.

    python -m bench.decode [--models tiny,small,demo] [--batch 1,8,32] [--tokens 64]

For each batch size, the engine decodes `--tokens` tokens per sequence (greedy, EOS ignored) in three
configurations measured side by side in one run: the base alone, the memory alone (served as if it
were the base: the cost of its forward), and base + memory mixed. floor = (t_base + t_mem) / t_base is
what running both models costs with no overlap; mixed / base should stay within 5% of it on a CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.common import model_sets, write_result
from memories.mixing import Mixture
from server.config import EngineConfig, ModelConfig
from server.engine import Engine
from server.loader import load_base
from server.registry import MemoryRegistry
from server.request import GenerationRequest, SamplingParams


def decode_step_time(engine: Engine, batch: int, tokens: int, memory: str | None, alpha: float) -> float:
    """Seconds per decode step (prefill excluded) of one run."""
    prompt = tuple(range(5, 37))
    for b in range(batch):
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        engine.add_request(GenerationRequest(f"r{b}", prompt, params, Mixture.single(memory, alpha)))
    engine.step()  # prefill
    t0 = time.perf_counter()
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
    return (time.perf_counter() - t0) / max(steps, 1)


def bench_models(label: str, base_path: str, mem_path: str, batches: list[int], tokens: int,
                 repeats: int) -> list[dict]:
    base = load_base(ModelConfig(base_path, quantization="none"))  # float, as the transformers references
    registry = MemoryRegistry(base)
    registry.load("mem", mem_path)
    mem_as_base = load_base(ModelConfig(mem_path, quantization="none"))
    cfg = EngineConfig(max_num_seqs=max(batches))
    engines = {
        "base": Engine(base, registry, cfg),
        "memory_alone": Engine(mem_as_base, MemoryRegistry(mem_as_base), cfg),
        "mixed": Engine(base, registry, cfg),
    }
    rows = []
    for batch in batches:
        for engine in engines.values():  # warm-up
            decode_step_time(engine, batch, 4, None, 0.0)
        runs: dict[str, list[float]] = {"base": [], "memory_alone": [], "mixed": []}
        for _ in range(repeats):  # round-robin, so load on a shared machine hits all three alike
            runs["base"].append(decode_step_time(engines["base"], batch, tokens, None, 0.0))
            runs["memory_alone"].append(decode_step_time(engines["memory_alone"], batch, tokens, None, 0.0))
            runs["mixed"].append(decode_step_time(engines["mixed"], batch, tokens, "mem", 0.6))
        t_base, t_mem, t_mix = (statistics.median(runs[k]) for k in ("base", "memory_alone", "mixed"))
        floor = (t_base + t_mem) / t_base
        rows.append(
            {
                "models": label,
                "batch": batch,
                "base_tok_s": batch / t_base,
                "mixed_tok_s": batch / t_mix,
                "base_step_ms": t_base * 1e3,
                "memory_step_ms": t_mem * 1e3,
                "mixed_step_ms": t_mix * 1e3,
                "mixed_over_base": t_mix / t_base,
                "floor": floor,
                "mixed_over_floor": (t_mix / t_base) / floor,
                "params_base": base.num_parameters,
                "params_memory": mem_as_base.num_parameters,
            }
        )
        print_row(rows[-1])
    return rows


def print_row(r: dict) -> None:
    print(
        f"{r['models']:>6} B={r['batch']:<3} base {r['base_tok_s']:9.1f} tok/s "
        f"({r['base_step_ms']:7.2f} ms)  "
        f"mixed {r['mixed_tok_s']:9.1f} tok/s ({r['mixed_step_ms']:7.2f} ms)  "
        f"mem alone {r['memory_step_ms']:7.2f} ms  "
        f"mixed/base {r['mixed_over_base']:.3f}  floor {r['floor']:.3f}  "
        f"mixed/floor {r['mixed_over_floor']:.3f}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,small,demo")
    parser.add_argument("--batch", default="1,8,32")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    batches = [int(b) for b in args.batch.split(",")]
    rows = []
    for label, base, memory in model_sets(args.models):
        rows += bench_models(label, base, memory, batches, args.tokens, args.repeats)
    path = write_result("decode", {"tokens_per_sequence": args.tokens, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
