"""The engine's own cost per decode step, and what a join or a leave costs, on the CPU.

    python -m bench.engine_overhead [--models demo,deep] [--batch 1,8] [--steps 48] [--threads 1]

Per model set and batch size, measured side by side in one run:
- step: wall time of one steady decode step of `Engine.step()` (base + memory, α = 0.6, greedy);
- forwards: the part of it spent in the two models' decode forwards (the runner's own timers);
- overhead = step − forwards: scheduling, batch upkeep, mixing, sampling, the host read, postprocessing;
- bare HF: one decode forward of each model through plain transformers with a DynamicCache at the same
  batch and context, as a floor for the forwards themselves.
Target (issue 12): overhead ≤ 10% of the forwards at batch 1 and 8.

Join/leave (the `deep` set, whose context is long enough): with 8 rows decoding at a context of 100
and of 1,000 tokens, the time of the step in which a 16-token request joins (its prefill), and of
ending one row (abort + the next step's batch upkeep). Neither should grow with the others' context.

`demo` is the shipped demo (its base, SmolLM2-135M-Instruct from GGUF, + biomed); `deep` is built here: a
random-init Qwen2 with the depth of Qwen2.5-0.5B (24 layers) at a small width, and a 6-layer memory, on the
demo base's tokenizer (49,152 tokens).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM

from bench.common import DEMO, cache_kwarg, demo_base_path, write_result
from memories.manifest import Manifest, tokenizer_fingerprint, write_manifest
from memories.mixing import Mixture
from server.config import EngineConfig, ModelConfig
from server.engine import Engine
from server.loader import load_base, load_tokenizer
from server.registry import MemoryRegistry
from server.request import GenerationRequest, SamplingParams


class PhaseLog:
    """An engine observer that keeps each step's phase times."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def on_step(self, stats) -> None:
        self.steps.append(stats.phases)

    def __getattr__(self, name):  # the other observer hooks: not needed here
        return lambda *a, **k: None


def deep_models(root: Path, tokenizer_from: str) -> tuple[str, str]:
    tok = load_tokenizer(tokenizer_from)  # the demo base's: a GGUF file carries its tokenizer
    paths = []
    for name, layers, hidden in (("deep-base", 24, 256), ("deep-mem", 6, 128)):
        torch.manual_seed(len(paths))
        config = Qwen2Config(
            vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
            eos_token_id=tok.eos_token_id, tie_word_embeddings=True,
        )
        path = root / name
        Qwen2ForCausalLM(config).eval().save_pretrained(path)
        tok.save_pretrained(path)
        paths.append(str(path))
    write_manifest(Path(paths[1]), Manifest(name="mem", domain="bench", alpha=0.6,
                                            tokenizer_fingerprint=tokenizer_fingerprint(tok)))
    return paths[0], paths[1]


def model_sets(labels: str, root: Path):
    for label in labels.split(","):
        base = demo_base_path() if label in ("demo", "deep") else None
        if label == "demo":
            memory = DEMO / "memories" / "biomed"
            if base is not None and not (memory / "memdec.json").is_file():
                print(f"no demo memory at {memory}: skipped", flush=True)
            elif base is not None:
                yield label, base, str(memory)
        elif label == "deep":
            if base is None:
                print("deep: skipped (it is built on the demo base's tokenizer)", flush=True)
            else:
                yield (label, *deep_models(root, base))
        else:
            raise SystemExit(f"unknown model set {label!r}")


def request(rid: str, prompt_len: int, tokens: int, memory: str | None = "mem") -> GenerationRequest:
    prompt = tuple(range(5, 5 + prompt_len))
    return GenerationRequest(rid, prompt, SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True),
                             Mixture.single(memory, 0.6))


class BareForward:
    """One plain-transformers decode forward (DynamicCache) of a model at a fixed batch and context."""

    def __init__(self, model, batch: int, context: int) -> None:
        self.model = model
        self.kw = cache_kwarg(model)
        self.ids = torch.arange(5, 5 + context).repeat(batch, 1)
        self.cache = DynamicCache()
        with torch.inference_mode():
            model(input_ids=self.ids[:, :-1], use_cache=True, **{self.kw: self.cache})

    @torch.inference_mode()
    def seconds(self) -> float:
        cache = DynamicCache()  # the same context every time
        for i, layer in enumerate(self.cache.layers):
            cache.update(layer.keys, layer.values, i)
        t0 = time.perf_counter()
        self.model(input_ids=self.ids[:, -1:], use_cache=True, **{self.kw: cache})
        return time.perf_counter() - t0


def overhead_rows(label: str, base_path: str, mem_path: str, batches: list[int], steps: int) -> list[dict]:
    base = load_base(ModelConfig(base_path, quantization="none"))  # float, as the transformers references
    registry = MemoryRegistry(base)
    registry.load("mem", mem_path)
    rows = []
    for batch in batches:
        log = PhaseLog()
        engine = Engine(base, registry, EngineConfig(max_num_seqs=max(batches)), observer=log)
        for b in range(batch):
            engine.add_request(request(f"r{b}", 64, steps + 8))
        for _ in range(4):  # prefill, batch build, warm-up
            engine.step()
        log.steps.clear()
        context = 64 + 4 + steps // 2
        bare = [BareForward(base.model, batch, context),
                BareForward(registry.loaded("mem").model, batch, context)]
        walls, bares = [], []
        for _ in range(steps):  # interleaved, so load on the machine hits both sides alike
            t0 = time.perf_counter()
            engine.step()
            walls.append(time.perf_counter() - t0)
            bares.append(sum(b.seconds() for b in bare))
        forwards = [p["base_forward"] + p["memory_forward"] for p in log.steps]
        step_s, fwd_s, bare_s = (statistics.median(walls), statistics.median(forwards),
                                 statistics.median(bares))
        overhead = statistics.median(w - f for w, f in zip(walls, forwards, strict=True))
        rows.append({
            "models": label, "batch": batch, "step_ms": step_s * 1e3, "forwards_ms": fwd_s * 1e3,
            "overhead_ms": overhead * 1e3, "overhead_pct_of_forwards": 100 * overhead / fwd_s,
            "bare_hf_forwards_ms": bare_s * 1e3, "forwards_over_bare_hf": fwd_s / bare_s,
            "params_base": base.num_parameters, "params_memory": registry.get("mem").num_parameters,
        })  # fmt: skip  # related fields grouped on a line
        r = rows[-1]
        print(f"{label:>5} B={batch:<2} step {r['step_ms']:7.2f} ms  forwards {r['forwards_ms']:7.2f} ms  "
              f"overhead {r['overhead_ms']:6.3f} ms ({r['overhead_pct_of_forwards']:4.1f}% of forwards)  "
              f"bare HF forwards {r['bare_hf_forwards_ms']:7.2f} ms "
              f"(engine/bare {r['forwards_over_bare_hf']:.2f})", flush=True)
    return rows


def join_leave_rows(base_path: str, mem_path: str, contexts: list[int], repeats: int = 5) -> list[dict]:
    base = load_base(ModelConfig(base_path, quantization="none"))  # float, as the transformers references
    registry = MemoryRegistry(base)
    registry.load("mem", mem_path)
    rows = []
    for context in contexts:
        engine = Engine(base, registry, EngineConfig(max_num_seqs=16))
        for b in range(8):
            engine.add_request(request(f"r{b}", context,
                                       10_000 if context + 10_000 < 2048 else 2048 - context - 1))
        for _ in range(3):
            engine.step()
        joins, leaves = [], []
        for k in range(repeats):
            engine.add_request(request(f"j{k}", 16, 1000))
            t0 = time.perf_counter()
            # the newcomer's prefill, in one forward with the running rows' decode (a mixed step)
            engine.step()
            joins.append(time.perf_counter() - t0)
            engine.step()
            t0 = time.perf_counter()
            engine.abort_request(f"j{k}")
            engine.runner.make_batch(engine.scheduler.running)  # the upkeep the next decode step does
            leaves.append(time.perf_counter() - t0)
            engine.step()
        rows.append({"context": context, "join_step_ms": statistics.median(joins) * 1e3,
                     "leave_ms": statistics.median(leaves) * 1e3})
        print(f" deep join/leave with 8 rows at context {context:>5}: "
              f"join step {rows[-1]['join_step_ms']:7.2f} ms  "
              f"leave {rows[-1]['leave_ms']:6.3f} ms", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="demo,deep")
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: stable numbers on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batch.split(",")]
    root = Path(tempfile.mkdtemp(prefix="memdec-bench-overhead-"))
    rows, join_leave = [], []
    for label, base, memory in model_sets(args.models, root):
        rows += overhead_rows(label, base, memory, batches, args.steps)
        if label == "deep":
            join_leave = join_leave_rows(base, memory, [100, 1000])
    path = write_result("engine_overhead", {"steps": args.steps, "threads": args.threads, "rows": rows,
                                            "join_leave": join_leave})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
