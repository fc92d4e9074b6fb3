"""Time to first token for long prompts, memory on vs off.

    python -m bench.prefill [--models tiny,small,demo] [--prompt 512] [--repeats 5]

Each measurement submits one request with a `--prompt`-token prompt to an idle engine and times it
until its first token. On a CPU the two models' prefills run one after the other, so the floor is
(t_base + t_mem) / t_base, with t_mem timed by serving the memory alone in the same run; on CUDA the
memory's prefill overlaps the base's on a second stream.
"""

from __future__ import annotations

import argparse
import statistics
import time

from bench.common import model_sets, write_result
from memories.mixing import Mixture
from server.config import EngineConfig, ModelConfig
from server.engine import Engine
from server.loader import load_base
from server.registry import MemoryRegistry
from server.request import GenerationRequest, SamplingParams


def ttft(engine: Engine, prompt_len: int, memory: str | None, r: int) -> float:
    """Seconds from adding one prompt to its first token, on an idle engine."""
    prompt = tuple((7 * i + r) % 300 + 1 for i in range(prompt_len))
    engine.add_request(GenerationRequest(f"p{r}", prompt, SamplingParams(max_tokens=1, temperature=0),
                                         Mixture.single(memory, 0.6)))
    t0 = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    return time.perf_counter() - t0


def bench(label: str, base_path: str, mem_path: str, prompt_len: int, repeats: int) -> dict:
    base = load_base(ModelConfig(base_path, quantization="none"))  # float, as the transformers references
    registry = MemoryRegistry(base)
    registry.load("mem", mem_path)
    mem_alone = load_base(ModelConfig(mem_path))
    prompt_len = min(prompt_len, base.max_model_len - 1, mem_alone.max_model_len - 1)
    runs: dict[str, list[float]] = {"base": [], "memory": [], "mixed": []}
    configs = {
        "base": (Engine(base, registry), None),
        "memory": (Engine(mem_alone, MemoryRegistry(mem_alone)), None),
        "mixed": (Engine(base, registry, EngineConfig()), "mem"),
    }
    # round-robin, so load on a shared machine hits all three alike; run 0 warms up
    for r in range(repeats + 1):
        for name, (engine, memory) in configs.items():
            t = ttft(engine, prompt_len, memory, r)
            if r:
                runs[name].append(t)
    t_base, t_mem, t_mix = (statistics.median(runs[k]) for k in ("base", "memory", "mixed"))
    row = {
        "models": label,
        "prompt_tokens": prompt_len,
        "ttft_base_ms": t_base * 1e3,
        "ttft_memory_alone_ms": t_mem * 1e3,
        "ttft_mixed_ms": t_mix * 1e3,
        "mixed_over_base": t_mix / t_base,
        "floor": (t_base + t_mem) / t_base,
    }
    print(
        f"{label:>6} prompt {prompt_len}: base {row['ttft_base_ms']:8.1f} ms  "
        f"mixed {row['ttft_mixed_ms']:8.1f} ms  "
        f"memory alone {row['ttft_memory_alone_ms']:8.1f} ms  mixed/base {row['mixed_over_base']:.3f}  "
        f"floor {row['floor']:.3f}",
        flush=True,
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,small,demo")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rows = []
    for label, base, memory in model_sets(args.models):
        rows.append(bench(label, base, memory, args.prompt, args.repeats))
    print(f"wrote {write_result('prefill', {'rows': rows})}")


if __name__ == "__main__":
    main()
