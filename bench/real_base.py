"""Decode speed and TTFT on the demo's real base (SmolLM2-135M-Instruct from its GGUF) and a demo memory,
side by side in one run: the base alone, base + memory (plain mixing), base + memory with speculative mixing
(adaptive K up to 4, memdec serve's default) and plain transformers `generate` (the base alone, DynamicCache).

    python -m bench.real_base [--batch 1,8,32] [--tokens 64] [--repeats 3] [--memory biomed]

Decode: tokens per second per configuration after the prefill (greedy, EOS ignored; prompts are 32-token
openings of the memory's domain's valid.txt), the median of `--repeats`, configurations round-robin so that
load on a shared machine hits them alike. TTFT: the engine's first step (the prefill that makes the first
token) for one 256-token prompt, base alone and mixed (no HTTP). Writes bench/results/real_base.json.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.common import DEMO, demo_base_path, write_result
from bench.speculative import decode_seconds, domain_prompts
from memories.mixing import Mixture
from server.config import EngineConfig, ModelConfig
from server.engine import Engine
from server.loader import LoadedModel, load_base
from server.registry import MemoryRegistry
from server.request import GenerationRequest, SamplingParams

SPECULATIVE_K = 4  # memdec serve's default (server.config.DEFAULT_SPECULATIVE_TOKENS)


@torch.inference_mode()
def generate_seconds(base: LoadedModel, prompts: list[tuple[int, ...]], tokens: int) -> float:
    """Seconds transformers' greedy `generate` spends on `tokens` − 1 decode steps (its prefill
    subtracted)."""
    ids = torch.tensor(prompts)  # [B, 32]: equal lengths, no padding
    mask = torch.ones_like(ids)

    def run(n: int) -> float:
        t0 = time.perf_counter()
        base.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                            do_sample=False, pad_token_id=base.tokenizer.eos_token_id)
        return time.perf_counter() - t0

    return run(tokens) - run(1)


def ttft_seconds(engine: Engine, prompt: tuple[int, ...], memory: str | None, alpha: float) -> float:
    engine.add_request(GenerationRequest("ttft", prompt, SamplingParams(max_tokens=1, temperature=0.0),
                                         Mixture.single(memory, alpha)))
    t0 = time.perf_counter()
    engine.step()
    took = time.perf_counter() - t0
    while engine.has_unfinished():
        engine.step()
    return took


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", default="1,8,32")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--memory", default="biomed")
    # none: the float32 weights docs/performance.md's table was measured with (bench/cpu_peer.py compares
    # schemes).
    p.add_argument("--quantization", default="none", choices=["auto", "none", "int8", "int4"])
    a = p.parse_args()
    path = demo_base_path()
    if path is None:
        raise SystemExit(2)
    batches = [int(b) for b in a.batch.split(",")]
    base = load_base(ModelConfig(path, quantization=a.quantization))
    registry = MemoryRegistry(base)
    info = registry.load(a.memory, str(DEMO / "memories" / a.memory))
    alpha = info.alpha

    def engine(k: int) -> Engine:
        return Engine(base, registry, EngineConfig(max_num_seqs=max(batches), speculative_tokens=k))

    engines = {"base": engine(0), "mixed": engine(0), "speculative": engine(SPECULATIVE_K)}
    memory_of = {"base": None, "mixed": a.memory, "speculative": a.memory}
    prompts = domain_prompts(base.tokenizer, info.domain, max(batches))
    rows = []
    for batch in batches:
        batch_prompts = prompts[:batch]
        for name, e in engines.items():  # warm-up; adaptive K measures this workload's costs
            decode_seconds(e, batch_prompts, a.tokens if name == "speculative" else 4, memory_of[name], alpha,
                           0.0)
        runs: dict[str, list[float]] = {name: [] for name in (*engines, "hf_generate")}
        for _ in range(a.repeats):
            for name, e in engines.items():
                runs[name].append(decode_seconds(e, batch_prompts, a.tokens, memory_of[name], alpha, 0.0)[0])
            runs["hf_generate"].append(generate_seconds(base, batch_prompts, a.tokens))
        generated = batch * (a.tokens - 1)
        tok_s = {name: generated / statistics.median(times) for name, times in runs.items()}
        rows.append({"batch": batch, "tok_s": tok_s,
                     "mixed_over_base": tok_s["mixed"] / tok_s["base"],
                     "speculative_over_mixed": tok_s["speculative"] / tok_s["mixed"],
                     "base_over_hf_generate": tok_s["base"] / tok_s["hf_generate"]})
        print(f"B={batch:<3} " + "  ".join(f"{n} {v:7.1f} tok/s" for n, v in tok_s.items()), flush=True)
    long_prompt = tuple(t for p_ in prompts for t in p_)[:256]
    ttft = {}
    for name in ("base", "mixed"):
        ttft_seconds(engines[name], long_prompt, memory_of[name], alpha)  # warm-up
        ttft[name] = statistics.median(ttft_seconds(engines[name], long_prompt, memory_of[name], alpha)
                                       for _ in range(a.repeats))
    print("TTFT (256-token prompt): " + "  ".join(f"{n} {v * 1e3:.0f} ms" for n, v in ttft.items()))
    out = write_result("real_base", {"base": path, "memory": a.memory, "alpha": alpha,
                                     "tokens_per_sequence": a.tokens, "threads": torch.get_num_threads(),
                                     "rows": rows,
                                     "ttft_ms_256_tokens": {k: v * 1e3 for k, v in ttft.items()}})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
