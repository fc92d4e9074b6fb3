"""Prefix caching and chunked prefill, side by side in one run (issue 21).

    OMP_NUM_THREADS=1 python -m bench.prefix_cache [--models demo] [--repeats 7]

1. TTFT with a memory (α 0.6) of a 420-token prompt whose first 400 tokens are already cached (an earlier
   request had the same 400 tokens and another 20-token ending) against the same prompt cold (a 400-token
   prefix never seen), and with prefix caching off. Target: cached ≤ 0.3 × cold.
2. While 8 streams decode (with the memory), a 450-token prompt arrives; `--max-num-batched-tokens 64`. The
   streams' inter-token latency (ITL) while the prompt is admitted — from the step it arrives to the step
   that gives it its first token — p99, against their p50 before it arrived, chunked vs unchunked. Target:
   chunked p99 ≤ 2 × p50.

Configurations run round-robin (one repetition of each, then the next), so load from other processes on a
shared machine hits all of them alike; repetition 0 warms up and is dropped; medians over repetitions.
Speculative mixing is off (the engine's default; `memdec serve` turns it on), so only prefill work differs.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import numpy as np

from bench.common import model_sets, write_result
from memories.mixing import Mixture
from server.config import EngineConfig, ModelConfig
from server.engine import Engine
from server.loader import load_base
from server.registry import MemoryRegistry
from server.request import GenerationRequest, SamplingParams

ALPHA = 0.6


def _tokens(rng: random.Random, n: int, vocab: int) -> tuple[int, ...]:
    return tuple(rng.randrange(10, vocab) for _ in range(n))


def _ttft(engine: Engine, rid: str, ids: tuple[int, ...]) -> float:
    """Seconds from adding one request (memory, one token) to an idle engine to its first token."""
    engine.add_request(GenerationRequest(rid, ids, SamplingParams(max_tokens=1, temperature=0.0),
                                         Mixture.one("mem", ALPHA)))
    t0 = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    return time.perf_counter() - t0


def bench_ttft(base, registry, repeats: int, prefix: int, suffix: int) -> dict:
    vocab = base.vocab_size
    engines = {"off": Engine(base, registry, EngineConfig(enable_prefix_caching=False)),
               "on": Engine(base, registry, EngineConfig())}
    runs: dict[str, list[float]] = {"caching_off": [], "cold": [], "cached": []}
    for r in range(repeats + 1):
        rng = random.Random(r)
        head = _tokens(rng, prefix, vocab)
        ids = head + _tokens(rng, suffix, vocab)
        t_off = _ttft(engines["off"], f"off{r}", ids)
        t_cold = _ttft(engines["on"], f"cold{r}", ids)  # this prefix was never seen; now it is cached
        # the same 400 tokens, another ending
        t_hit = _ttft(engines["on"], f"hit{r}", head + _tokens(rng, suffix, vocab))
        if r:
            runs["caching_off"].append(t_off)
            runs["cold"].append(t_cold)
            runs["cached"].append(t_hit)
    med = {k: statistics.median(v) for k, v in runs.items()}
    row = {
        "prompt_tokens": prefix + suffix,
        "cached_tokens": prefix,
        "ttft_caching_off_ms": med["caching_off"] * 1e3,
        "ttft_cold_ms": med["cold"] * 1e3,
        "ttft_cached_ms": med["cached"] * 1e3,
        "cached_over_cold": med["cached"] / med["cold"],
        "cold_over_caching_off": med["cold"] / med["caching_off"],
        "runs_ms": {k: [round(t * 1e3, 2) for t in v] for k, v in runs.items()},
    }
    print(f"  TTFT {prefix + suffix} tokens, {prefix} cached, with a memory: "
          f"caching off {row['ttft_caching_off_ms']:.1f} ms, "
          f"cold {row['ttft_cold_ms']:.1f} ms, cached {row['ttft_cached_ms']:.1f} ms -> cached/cold "
          f"{row['cached_over_cold']:.3f} (target <= 0.3)", flush=True)
    return row


def _arrival(engine: Engine, r: int, streams: int, long_prompt: int,
             steady_steps: int) -> tuple[list[float], list[float], int]:
    """ITL gaps (seconds) of the streams before a long prompt arrives and while it is admitted; steps it
    took."""
    vocab = engine.base.vocab_size
    rng = random.Random(100 + r)
    params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    ids = [f"s{r}-{i}" for i in range(streams)]
    for rid in ids:
        engine.add_request(GenerationRequest(rid, _tokens(rng, 32, vocab), params, Mixture.one("mem", ALPHA)))
    last: dict[str, float] = {}
    before: list[float] = []
    during: list[float] = []

    def step(into: list[float] | None) -> list:
        outs = engine.step().outputs
        now = time.perf_counter()
        for o in outs:
            if o.request_id in last and into is not None:
                into.append(now - last[o.request_id])
            last[o.request_id] = now
        return outs

    for _ in range(3):  # every stream prefilled and decoding
        step(None)
    for _ in range(steady_steps):
        step(before)
    long_id = f"long{r}"
    engine.add_request(GenerationRequest(long_id, _tokens(rng, long_prompt, vocab),
                                         SamplingParams(max_tokens=1, temperature=0.0),
                                         Mixture.one("mem", ALPHA)))
    steps = 0
    while True:  # from its arrival to its first token
        steps += 1
        if any(o.request_id == long_id for o in step(during)):
            break
    for rid in ids:
        engine.abort_request(rid)
    while engine.has_unfinished():
        engine.step()
    return before, during, steps


def bench_chunked(base, registry, repeats: int, budget: int, streams: int, long_prompt: int,
                  steady_steps: int) -> dict:
    engines = {
        "chunked": Engine(base, registry, EngineConfig(max_num_batched_tokens=budget)),
        "unchunked": Engine(base, registry,
                            EngineConfig(max_num_batched_tokens=budget, enable_chunked_prefill=False)),
    }
    per: dict[str, dict[str, list[float]]] = {k: {"p50": [], "p99": [], "ratio": [], "steps": []}
                                              for k in engines}
    for r in range(repeats + 1):
        for name, engine in engines.items():
            before, during, steps = _arrival(engine, r, streams, long_prompt, steady_steps)
            if not r:
                continue
            p50 = float(np.percentile(before, 50))
            p99 = float(np.percentile(during, 99))
            for key, val in (("p50", p50), ("p99", p99), ("ratio", p99 / p50), ("steps", steps)):
                per[name][key].append(val)
    row: dict = {"streams": streams, "long_prompt_tokens": long_prompt, "max_num_batched_tokens": budget}
    for name, vals in per.items():
        row[name] = {
            "itl_p50_before_ms": statistics.median(vals["p50"]) * 1e3,
            "itl_p99_during_ms": statistics.median(vals["p99"]) * 1e3,
            "p99_over_p50": statistics.median(vals["ratio"]),
            "steps_to_first_token": statistics.median(vals["steps"]),
            "runs_ratio": [round(v, 3) for v in vals["ratio"]],
        }
        print(f"  {name:>9}: ITL p50 before {row[name]['itl_p50_before_ms']:.1f} ms, p99 during the arrival "
              f"{row[name]['itl_p99_during_ms']:.1f} ms -> p99/p50 {row[name]['p99_over_p50']:.2f} "
              f"({row[name]['steps_to_first_token']:.0f} steps to its first token)", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="demo")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--prefix", type=int, default=400)
    parser.add_argument("--suffix", type=int, default=20)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--long-prompt", type=int, default=450)
    parser.add_argument("--max-num-batched-tokens", type=int, default=64)
    parser.add_argument("--steady-steps", type=int, default=12)
    args = parser.parse_args()
    rows = []
    for label, base_path, mem_path in model_sets(args.models):
        base = load_base(ModelConfig(base_path))
        registry = MemoryRegistry(base)
        registry.load("mem", mem_path)
        print(f"{label} (memory {mem_path.rsplit('/', 1)[-1]}):", flush=True)
        ttft = bench_ttft(base, registry, args.repeats, args.prefix, args.suffix)
        chunked = bench_chunked(base, registry, args.repeats, args.max_num_batched_tokens, args.streams,
                                args.long_prompt, args.steady_steps)
        rows.append({"models": label, "ttft": ttft, "arrival": chunked})
    print(f"wrote {write_result('prefix_cache', {'rows': rows})}")


if __name__ == "__main__":
    main()
