"""GPU acceptance for the engine: one NVIDIA GPU, no network, torch + transformers only (≤ 8 minutes).

    python -m bench.gpu_acceptance [--out DIR] [--quick] [--device cuda|cpu]

Models: the shipped demo (its base, SmolLM2-135M-Instruct from the GGUF file pinned in demo/base.json,
installed by `python -m server.demo install`, and its biomed, legal and finance memories) and, built here
from configs with random weights, a base and a memory at real shapes (Qwen2.5-1.5B and Qwen2.5-0.5B: 28 and
24 layers, 151,936-row vocabularies) on a synthetic 151,665-token tokenizer. Nothing is downloaded.

  (a) churn    greedy float32 tokens are identical with CUDA streams on/off × CUDA graphs on/off on a
               join/leave workload (demo models, three memories); the four runs also go through a
               subprocess under TORCH_CUDA_SANITIZER=1 (PyTorch's stream-race detector), which tracks
               everything but the shared KV arena (see exclude_arenas_from_sanitizer).
  (b) syncs    steady mixed decode (graphs, then eager) under torch.cuda.set_sync_debug_mode("error"):
               no operation may synchronise implicitly (the engine's one explicit read is an event wait).
  (c) overlap  a profiler trace of mixed decode (real shapes, batch 1 and 8); the fraction of the
               memory stream's kernel time that overlaps the base stream's kernels.
  (d) bf16     mixed log-probs served in bfloat16 vs a float32 reference (full forwards + the formula):
               total variation and top-token log-prob error, demo and real shapes.
  (e) speed    decode tokens/s at batch 1/8/64 for the base alone, base + memory (α 0.6), and HF
               `generate` (base alone); eager vs graphs at batch 1; step time vs the roofline (weights +
               KV bytes read per step ÷ measured copy bandwidth).
  (f) spec     speculative mixing (issue 13). Per-token acceptance β of the demo pair at α 0.6 (greedy
               and sampled, one draft per round), measured by the engine on the GPU; the cost of a round
               drafting k = 1, 2, 4, 6 tokens at real shapes (graphs, streams) at batch 1 and 8, against a
               plain mixed step and the base alone; per-token latency = round(k) / E(β, k),
               E = (1 − β^(k+1)) / (1 − β), at the best k. Also: greedy tokens identical with and without
               speculation on the demo churn workload (graphs + streams), and no implicit sync in steady
               rounds (set_sync_debug_mode("error")).

Targets (issue 12): base + memory ≤ 1.15× base alone per step at batch 1; base step ≤ 3× its roofline
at batch 1; ≥ 5× HF generate at batch 1. Issue 13: speculative per-token latency at batch 1 ≤ 0.7× the
base alone at α = 0.6. Prints a table and writes gpu_acceptance.json (to --out, else $OUT when set, else
bench/results). `--device cpu` runs the same code small, to check the script itself.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from bench.common import demo_base_path
from bench.speculative import SpecCounts, domain_prompts
from memories.manifest import Manifest, tokenizer_fingerprint, write_manifest
from memories.mixing import Mixture, mix_logprobs
from memories.router import DEFAULT_CONTEXT_DECAYS, Router, RouterConfig, save_router
from server.config import EngineConfig, ModelConfig
from server.engine import Engine
from server.loader import load_base
from server.registry import MemoryRegistry
from server.request import GenerationRequest, SamplingParams
from server.speculative import expected_tokens

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "demo"
DEMO_MEMORIES = ("biomed", "legal", "finance")
BUDGET_S = 8 * 60
REAL_SHAPES = {  # from the published Qwen2.5 configs
    "base": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2),
    "memory": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                   num_key_value_heads=2),
}
SMALL_SHAPES = {  # --device cpu: the same code at a size a CPU runs in seconds
    "base": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2),
    "memory": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2),
}
SPEC_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}  # bytes/s, for reference only


# -- models ------------------------------------------------------------------------------------------
def demo_base() -> str:
    """The demo base's GGUF file; an error (the part that needs it fails, the others run) when not
    installed."""
    path = demo_base_path()
    if path is None:
        raise RuntimeError("the demo base is not installed: python -m server.demo install")
    return path


def synthetic_tokenizer(path: Path, size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer of `size` tokens (t0 … t{size-2} and an EOS): real vocabulary width, no
    merges."""
    vocab = {f"t{i}": i for i in range(size - 1)}
    vocab["<|endoftext|>"] = size - 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="t0")
    fast.save_pretrained(path)
    return fast


def real_shape_models(root: Path, small: bool) -> tuple[str, str]:
    """A base and a memory with Qwen2.5's shapes and random weights, saved as safetensors (+ a manifest)."""
    shapes = SMALL_SHAPES if small else REAL_SHAPES
    vocab_rows, tok_size = (2048, 2000) if small else (151936, 151665)
    tok = synthetic_tokenizer(root / "tokenizer", tok_size)
    paths = []
    for i, name in enumerate(("base", "memory")):
        torch.manual_seed(i)
        config = Qwen2Config(
            vocab_size=vocab_rows, max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=True,
            eos_token_id=tok.eos_token_id, torch_dtype="bfloat16", **shapes[name],
        )
        with torch.device("cuda" if not small else "cpu"):  # random init of 1.5B weights is seconds on a GPU
            model = Qwen2ForCausalLM(config).to(torch.bfloat16)
        path = root / name
        model.save_pretrained(path)
        tok.save_pretrained(path)
        paths.append(str(path))
        del model
    # A router with context features, so "alpha": "auto" rows (their per-row state included) run in the sync
    # check.
    router = Router(RouterConfig.with_context(DEFAULT_CONTEXT_DECAYS, hidden=16))
    entry = save_router(router, paths[1])
    write_manifest(Path(paths[1]), Manifest(name="memory", domain="bench", alpha=0.6,
                                            tokenizer_fingerprint=tokenizer_fingerprint(tok), router=entry))
    return paths[0], paths[1]


def engine_with(base_dir: str, memories: dict[str, str], device: str, dtype: str,
                **config) -> tuple[Engine, MemoryRegistry]:
    """An engine on these models. Several engines live at once here, so each gets a fixed number of KV
    pages (room for every slot at full length in the base and a memory) unless the caller says otherwise."""
    base = load_base(ModelConfig(base_dir, dtype=dtype, device=device), config.pop("max_model_len", None))
    if "gpu_memory_utilization" not in config:
        config.setdefault("num_gpu_blocks_override",
                          2 * config.get("max_num_seqs", 64) * -(-base.max_model_len // 16) + 1)
    registry = MemoryRegistry(base)
    for name, path in memories.items():
        registry.load(name, path)
    return Engine(base, registry, EngineConfig(**config)), registry


def drive(engine: Engine, requests: list[GenerationRequest],
          join: dict[int, list[GenerationRequest]] | None = None):
    """Step to completion; returns {request id: [token ids]} and {request id: [TokenLogprob]}."""
    join = join or {}
    tokens: dict[str, list[int]] = {}
    logprobs: dict[str, list] = {}
    for r in requests:
        engine.add_request(r)
    step = 0
    while engine.has_unfinished() or any(k >= step for k in join):
        for r in join.get(step, []):
            engine.add_request(r)
        for out in engine.step().outputs:
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            logprobs.setdefault(out.request_id, []).extend(out.new_logprobs or ())
        step += 1
    return tokens, logprobs


def greedy(rid: str, prompt: tuple[int, ...], n: int, memory: str | None, alpha: float,
           **kw) -> GenerationRequest:
    return GenerationRequest(rid, prompt,
                             SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **kw),
                             Mixture.single(memory, alpha))


# -- (a) churn -----------------------------------------------------------------------------------------
CHURN_CONFIGS = {
    "streams+graphs": dict(use_cuda_streams=True, enforce_eager=False),
    "streams, eager": dict(use_cuda_streams=True, enforce_eager=True),
    "one stream+graphs": dict(use_cuda_streams=False, enforce_eager=False),
    "one stream, eager": dict(use_cuda_streams=False, enforce_eager=True),
}


def churn_workload(vocab: int) -> tuple[list[GenerationRequest], dict[int, list[GenerationRequest]]]:
    """Rows with different memories, α, prompt lengths and lengths, joining over the first steps."""
    mems = [*DEMO_MEMORIES, None]
    reqs = [
        greedy(f"c{i}", tuple((7 * i + 11 * t) % (vocab - 10) + 5 for t in range(4 + 9 * i % 37)),
               6 + (5 * i) % 19, mems[i % 4], (0.2, 0.5, 0.8, 1.0)[i % 4])
        for i in range(24)
    ]
    join: dict[int, list[GenerationRequest]] = {}
    for i, r in enumerate(reqs[6:]):
        join.setdefault(1 + 2 * i, []).append(r)
    return reqs[:6], join


# KV arenas the sanitizer does not track (see exclude_arenas_from_sanitizer)
_ARENAS: list[tuple[int, int]] = []


def exclude_arenas_from_sanitizer() -> str | None:
    """PyTorch's CUDA sanitizer tracks accesses per tensor data pointer. The models' views of the shared KV
    arena all start at its first byte although they touch disjoint pages, so it would call every step in
    which the base (main stream) and a memory (side stream) run at once a race. The arena is left out of its
    tracking; that a page belongs to one model and one slot at a time is checked after every step of the
    CPU churn test (tests/engine_helpers.assert_pages_owned_once). Everything else — the logits handed from
    the side stream, uploads, graph buffers, the token table — stays tracked. Returns an error text if the
    sanitizer's internals differ from what this patch expects."""
    try:
        from torch.cuda import _sanitizer

        original = _sanitizer.ArgumentHandler._handle_argument
    except (ImportError, AttributeError) as exc:
        return f"cannot exclude the KV arena from the sanitizer: {exc}"

    def handle(self, value, *args, **kwargs):
        if (isinstance(value, torch.Tensor) and value.is_cuda
                and any(lo <= value.data_ptr() < hi for lo, hi in _ARENAS)):
            return None
        return original(self, value, *args, **kwargs)

    _sanitizer.ArgumentHandler._handle_argument = handle
    return None


def churn_tokens(device: str, config: dict) -> dict[str, list[int]]:
    memories = {m: str(DEMO / "memories" / m) for m in DEMO_MEMORIES}
    engine, _ = engine_with(demo_base(), memories, device, "float32", max_num_seqs=8, block_size=4, **config)
    arena = engine.runner.pool.arena
    _ARENAS.append((arena.data_ptr(), arena.data_ptr() + arena.numel()))
    first, join = churn_workload(engine.base.vocab_size)
    tokens, _ = drive(engine, first, join)
    return tokens


def part_churn(device: str) -> dict:
    runs = {}
    for name, config in CHURN_CONFIGS.items():
        runs[name] = churn_tokens(device, config)
    reference = runs["one stream, eager"]
    same = {name: tokens == reference for name, tokens in runs.items()}
    result = {"identical": same, "requests": len(reference), "tokens": sum(map(len, reference.values()))}
    if device == "cuda":  # the same four runs in a subprocess under PyTorch's CUDA sanitizer
        env = {**os.environ, "TORCH_CUDA_SANITIZER": "1"}
        proc = subprocess.run([sys.executable, "-m", "bench.gpu_acceptance", "--sanitized-churn"], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=240)
        try:
            sanitized = json.loads(proc.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            sanitized = {"error": (proc.stderr or proc.stdout)[-3000:]}
        # Per config: True (same tokens, no race), False (other tokens), "race: ..." or "error: ..." (for
        # instance the sanitizer refusing graph capture: replays are invisible to it anyway).
        result["sanitizer"] = {
            name: out if isinstance(out, str) else out == reference for name, out in sanitized.items()
        } if "error" not in sanitized else sanitized
    checks = result.get("sanitizer", {})
    races = [v for v in checks.values() if isinstance(v, str) and v.startswith("race")]
    result["ok"] = all(same.values()) and not races and False not in checks.values() and "error" not in checks
    return result


def sanitized_churn() -> None:
    """Subprocess body: each config under the sanitizer; prints one JSON line of tokens or error texts."""
    out: dict[str, object] = {}
    problem = exclude_arenas_from_sanitizer()
    if problem is not None:
        out["error"] = problem
    for name, config in CHURN_CONFIGS.items():
        try:
            out[name] = churn_tokens("cuda", config)
            torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001 - a detected race is reported, not raised
            kind = "race" if type(exc).__name__ == "CUDASanitizerErrors" else "error"
            out[name] = f"{kind}: {type(exc).__name__}: {str(exc)[:1500]}"
    print(json.dumps(out))


# -- (b) syncs -------------------------------------------------------------------------------------------
def mixed_batch(vocab: int, batch: int, n: int, prompt_len: int = 100) -> list[GenerationRequest]:
    reqs = []
    for i in range(batch):
        prompt = tuple((13 * i + 7 * t) % (vocab - 10) + 5 for t in range(prompt_len))
        if i % 3 == 2:  # sampled, with top-p and log-probs
            params = SamplingParams(max_tokens=n, temperature=0.8, top_p=0.9, seed=i, ignore_eos=True,
                                    logprobs=5)
            reqs.append(GenerationRequest(f"s{i}", prompt, params, Mixture.one("memory", 0.6)))
        elif i == 1:  # "alpha": "auto" with a context router: its EMAs advance on the device every step
            params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=5)
            reqs.append(GenerationRequest(f"r{i}", prompt, params, Mixture.auto("memory")))
        else:
            reqs.append(greedy(f"g{i}", prompt, n, "memory" if i % 3 == 0 else None, 0.6))
    return reqs


def steps_without_sync(engine: Engine, steps: int) -> dict:
    """Steady decode steps of a mixed batch under set_sync_debug_mode("error"): any implicit sync raises."""
    for r in mixed_batch(engine.base.vocab_size, 6, 64):
        engine.add_request(r)
    for _ in range(3):  # prefill, then a decode step that builds the batch
        engine.step()
    done, error = 0, None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(steps):
            engine.step()
            done += 1
    except RuntimeError as exc:
        error = f"{exc}\n{traceback.format_exc()[-2000:]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    while engine.has_unfinished():
        engine.step()
    return {"steps": done, "ok": error is None, "error": error}


def part_syncs(base_dir: str, mem_dir: str, device: str) -> dict:
    result = {}
    for mode, eager in (("graphs", False), ("eager", True)):
        # Sized by --gpu-memory-utilization: the profiling path that picks the KV budget runs here too.
        engine, _ = engine_with(base_dir, {"memory": mem_dir}, device, "bfloat16", max_num_seqs=8,
                                max_model_len=2048, enforce_eager=eager, gpu_memory_utilization=0.5)
        result[f"{mode}_kv_pages"] = engine.cache_usage().usable_pages
        # crosses KV pages (16 tokens) twice: uploads stay asynchronous
        result[mode] = steps_without_sync(engine, 40)
        del engine
        gc.collect()
    result["ok"] = all(v["ok"] for v in result.values() if isinstance(v, dict))
    return result


# -- (c) overlap -------------------------------------------------------------------------------------------
def _kernel_intervals(prof) -> dict[int, list[tuple[float, float]]]:
    by_stream: dict[int, list[tuple[float, float]]] = {}
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        trace = json.loads(Path(f.name).read_text())
    for ev in trace.get("traceEvents", []):
        if ev.get("cat") == "kernel" and "dur" in ev:
            stream = int(ev.get("args", {}).get("stream", ev.get("tid", -1)))
            by_stream.setdefault(stream, []).append((float(ev["ts"]), float(ev["ts"]) + float(ev["dur"])))
    return by_stream


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for a, b in sorted(intervals):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def _overlap(xs: list[tuple[float, float]], ys: list[tuple[float, float]]) -> float:
    total, j = 0.0, 0
    for a, b in xs:
        while j < len(ys) and ys[j][1] <= a:
            j += 1
        k = j
        while k < len(ys) and ys[k][0] < b:
            total += max(0.0, min(b, ys[k][1]) - max(a, ys[k][0]))
            k += 1
    return total


def profile_decode(engine: Engine, requests: list[GenerationRequest], steps: int):
    from torch.profiler import ProfilerActivity, profile

    for r in requests:
        engine.add_request(r)
    for _ in range(3):
        engine.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    while engine.has_unfinished():
        engine.step()
    return prof


def part_overlap(base_dir: str, mem_dir: str, device: str, out_dir: Path) -> dict:
    engine, _ = engine_with(base_dir, {"memory": mem_dir}, device, "bfloat16", max_num_seqs=8,
                            max_model_len=2048)
    vocab = engine.base.vocab_size
    # Which stream is the base's: a base-alone run puts every kernel there.
    alone = _kernel_intervals(profile_decode(engine, [greedy("a", (5, 6, 7), 40, None, 0.0)], 8))
    main_stream = max(alone, key=lambda s: sum(b - a for a, b in alone[s]))
    result = {}
    for batch in (1, 8):
        reqs = [greedy(f"b{batch}-{i}", tuple((i * 31 + t) % (vocab - 10) + 5 for t in range(64)), 60,
                       "memory", 0.6) for i in range(batch)]
        prof = profile_decode(engine, reqs, 20)
        if batch == 8:
            prof.export_chrome_trace(str(out_dir / "decode_trace.json"))
        streams = _kernel_intervals(prof)
        base_iv = _union(streams.get(main_stream, []))
        mem_iv = _union([iv for s, ivs in streams.items() if s != main_stream for iv in ivs])
        mem_time = sum(b - a for a, b in mem_iv)
        result[f"batch{batch}"] = {
            "memory_kernel_us": mem_time, "base_kernel_us": sum(b - a for a, b in base_iv),
            "overlap_fraction": _overlap(mem_iv, base_iv) / mem_time if mem_time else 0.0,
        }
    result["trace"] = "decode_trace.json (batch 8)"
    return result


# -- (d) bf16 ------------------------------------------------------------------------------------------------
@torch.no_grad()
def _reference_logp(base_model, mem_model, context: list[int], alpha: float, vocab: int,
                    device: str) -> torch.Tensor:
    ids = torch.tensor([context], device=device)
    base = torch.log_softmax(base_model(ids).logits[0, -1, :vocab].float(), -1)
    mem = torch.log_softmax(mem_model(ids).logits[0, -1, :vocab].float(), -1)
    return mix_logprobs(base, mem, alpha)


def bf16_errors(base_dir: str, memories: dict[str, str], device: str,
                requests: list[GenerationRequest]) -> dict:
    """Served bfloat16 mixed log-probs of `requests` against float32 references, over the whole vocabulary
    (every request is served with `logprobs` = the base's vocabulary size, whatever it asked for)."""
    engine, registry = engine_with(base_dir, memories, device, "bfloat16", max_num_seqs=8)
    vocab = engine.base.vocab_size
    requests = [replace(r, params=replace(r.params, logprobs=vocab)) for r in requests]
    _, logprobs = drive(engine, requests)
    ref_base = load_base(ModelConfig(base_dir, dtype="float32", device=device))
    ref_mems = {name: load_base(ModelConfig(path, dtype="float32", device=device)).model
                for name, path in memories.items()}
    tv, top_err = [], []
    for r in requests:
        context = list(r.prompt_token_ids)
        for lp in logprobs[r.request_id]:
            got = torch.full((vocab,), float("-inf"), device=device)
            ids, vals = zip(*lp.top, strict=True)
            got[list(ids)] = torch.tensor(vals, device=device)
            ref = _reference_logp(ref_base.model, ref_mems[r.mixture.names[0]], context,
                                  r.mixture.terms[0].alpha, vocab, device)
            tv.append(0.5 * (got.exp() - ref.exp()).abs().sum().item())
            top = ref.topk(5).indices
            top_err.append((got[top] - ref[top]).abs().max().item())
            context.append(lp.token_id)
    del engine, registry, ref_base, ref_mems
    return {"max_total_variation": max(tv), "max_top5_logprob_error": max(top_err), "positions": len(tv),
            "ok": max(tv) <= 0.05 and max(top_err) <= 0.15}


def part_bf16(base_dir: str, mem_dir: str, device: str) -> dict:
    demo_mems = {m: str(DEMO / "memories" / m) for m in DEMO_MEMORIES}
    demo_reqs = [greedy(f"d{i}", tuple(range(5 + i, 40 + 3 * i)), 8, m, a)
                 for i, (m, a) in enumerate(zip(DEMO_MEMORIES, (0.8, 0.5, 0.9), strict=True))]
    real_reqs = [greedy(f"r{i}", tuple(range(5 + i, 70 + i)), 6, "memory", 0.6) for i in range(2)]
    return {"demo": bf16_errors(demo_base(), demo_mems, device, demo_reqs),
            "real_shapes": bf16_errors(base_dir, {"memory": mem_dir}, device, real_reqs)}


# -- (e) speed -----------------------------------------------------------------------------------------------
def copy_bandwidth(device: str) -> float:
    """Device memory bandwidth (bytes/s) measured by a large device-to-device copy."""
    n = (1 << 30) if device == "cuda" else (1 << 26)
    x = torch.empty(n, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    sync(device)
    return 2 * n * 10 / (time.perf_counter() - t0)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def engine_step_seconds(engine: Engine, requests: list[GenerationRequest]) -> float:
    """Median seconds per decode step once every row is decoding."""
    for r in requests:
        engine.add_request(r)
    # prompts in chunks
    while engine.scheduler.waiting or any(s.in_prefill for s in engine.scheduler.running):
        engine.step()
    engine.step()  # builds the decode batch
    times = []
    while engine.has_unfinished():
        t0 = time.perf_counter()
        result = engine.step()
        times.append(time.perf_counter() - t0)
        if result.outputs and any(o.finished for o in result.outputs):
            break
    while engine.has_unfinished():
        engine.step()
    return statistics.median(times[1:] or times)


@torch.inference_mode()
def hf_generate_token_seconds(model, batch: int, prompt_len: int, n: int, device: str) -> float:
    ids = torch.randint(5, 1000, (batch, prompt_len), device=device)
    common = dict(do_sample=False, pad_token_id=0, eos_token_id=None)

    def timed(k: int) -> float:
        sync(device)
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=k, **common)  # no EOS: every row runs k tokens
        sync(device)
        return time.perf_counter() - t0

    timed(2)  # warm-up
    return (timed(n) - timed(1)) / (n - 1)


def part_speed(base_dir: str, mem_dir: str, device: str, batches: list[int], n: int) -> dict:
    bandwidth = copy_bandwidth(device)
    rows = []
    engines = {
        "graphs": engine_with(base_dir, {"memory": mem_dir}, device, "bfloat16", max_num_seqs=max(batches),
                              max_model_len=2048)[0],
        "eager": engine_with(base_dir, {"memory": mem_dir}, device, "bfloat16", max_num_seqs=max(batches),
                             max_model_len=2048, enforce_eager=True)[0],
    }
    engine = engines["graphs"]
    base = engine.base
    mem = engine.registry.loaded("memory")
    weight_bytes = {k: sum(p.numel() * p.element_size() for p in m.model.parameters())
                    for k, m in (("base", base), ("memory", mem))}
    token_bytes = {k: engine.runner.kv(key).geometry.token_bytes
                   for k, key in (("base", None), ("memory", "memory"))}
    prompt_len = 128
    for batch in batches:
        prompts = [tuple((37 * i + t) % (base.vocab_size - 10) + 5 for t in range(prompt_len))
                   for i in range(batch)]
        t_base = engine_step_seconds(engine,
                                     [greedy(f"b{i}", p, n, None, 0.0) for i, p in enumerate(prompts)])
        t_mix = engine_step_seconds(engine,
                                    [greedy(f"m{i}", p, n, "memory", 0.6) for i, p in enumerate(prompts)])
        t_hf = hf_generate_token_seconds(base.model, batch, prompt_len, min(n, 64), device)
        context = prompt_len + n // 2
        roof_base = (weight_bytes["base"] + batch * context * token_bytes["base"]) / bandwidth
        roof_mix = roof_base + (weight_bytes["memory"] + batch * context * token_bytes["memory"]) / bandwidth
        row = {
            "batch": batch,
            "base_step_ms": t_base * 1e3, "mixed_step_ms": t_mix * 1e3, "hf_generate_step_ms": t_hf * 1e3,
            "base_tok_s": batch / t_base, "mixed_tok_s": batch / t_mix, "hf_generate_tok_s": batch / t_hf,
            "mixed_over_base": t_mix / t_base, "base_over_roofline": t_base / roof_base,
            "mixed_over_roofline": t_mix / roof_mix, "engine_over_hf_speedup": t_hf / t_base,
            "roofline_base_ms": roof_base * 1e3,
        }  # fmt: skip  # related fields grouped on a line
        if batch == 1:
            eager = engines["eager"]
            row["eager_base_step_ms"] = engine_step_seconds(
                eager, [greedy("e", prompts[0], n, None, 0.0)]) * 1e3
            row["eager_mixed_step_ms"] = engine_step_seconds(
                eager, [greedy("e", prompts[0], n, "memory", 0.6)]) * 1e3
        rows.append(row)
    capture = {"base": engine.runner.models[None].capture_seconds,
               "memory": engine.runner.models["memory"].capture_seconds}
    b1 = rows[0]
    targets = {
        "mixed/base <= 1.15 at batch 1": b1["mixed_over_base"] <= 1.15,
        "base <= 3x roofline at batch 1": b1["base_over_roofline"] <= 3.0,
        ">= 5x HF generate at batch 1": b1["engine_over_hf_speedup"] >= 5.0,
    }
    return {"bandwidth_GBps": bandwidth / 1e9, "weight_bytes": weight_bytes, "kv_token_bytes": token_bytes,
            "capture_seconds": capture, "rows": rows, "targets": targets}


# -- (f) speculative mixing --------------------------------------------------------------------------------
SPEC_KS = (1, 2, 4, 6)


def demo_acceptance(device: str) -> dict:
    """Per-token acceptance β of the demo pair (biomed) at α 0.6 on this device, 64 tokens x 8 rows: with one
    draft per round (K = 1) kept drafts / drafts is β itself (with more, drafts after a rejection count
    too)."""
    base = load_base(ModelConfig(demo_base(), dtype="float32", device=device))
    registry = MemoryRegistry(base)
    registry.load("biomed", str(DEMO / "memories" / "biomed"))
    prompts = domain_prompts(base.tokenizer, "biomedical", 8)  # held-out text, or the synthetic kind
    out = {}
    for mode, temperature in (("greedy", 0.0), ("sampled", 1.0)):
        counts = SpecCounts()
        engine = Engine(base, registry,
                        EngineConfig(max_num_seqs=8, speculative_tokens=1, speculative_adaptive=False,
                                     num_gpu_blocks_override=1025), observer=counts)
        reqs = [GenerationRequest(f"a{i}", p, SamplingParams(max_tokens=64, temperature=temperature, seed=i,
                                                             ignore_eos=True),
                                  Mixture.one("biomed", 0.6)) for i, p in enumerate(prompts)]
        drive(engine, reqs)
        out[mode] = counts.accepted / max(1, counts.drafted)
    return out


def spec_tokens_identical(device: str) -> bool:
    """Greedy demo churn (three memories, joins and leaves) with K = 3, graphs and streams: the same tokens as
    the same workload without speculation."""
    plain = CHURN_CONFIGS["streams+graphs"]
    return (churn_tokens(device, {**plain, "speculative_tokens": 3, "speculative_adaptive": False})
            == churn_tokens(device, plain))


def part_spec(base_dir: str, mem_dir: str, device: str, batches: list[int], n: int) -> dict:
    """Acceptance on the demo pair, cost per round at real shapes, and the projected per-token latency."""
    beta = demo_acceptance(device)
    base = load_base(ModelConfig(base_dir, dtype="bfloat16", device=device), 2048)
    registry = MemoryRegistry(base)
    registry.load("memory", mem_dir)
    pages = 2 * max(batches) * (2048 // 16) + 1

    def engine(k: int) -> Engine:
        config = EngineConfig(max_num_seqs=max(batches), speculative_tokens=k, speculative_adaptive=False,
                              num_gpu_blocks_override=pages)
        return Engine(base, registry, config)

    plain = engine(0)
    prompts = [tuple((37 * i + t) % (base.vocab_size - 10) + 5 for t in range(128))
               for i in range(max(batches))]
    rows = []
    for batch in batches:
        row: dict = {"batch": batch}
        row["base_step_ms"] = engine_step_seconds(plain, [greedy(f"b{i}", prompts[i], n, None, 0.0)
                                                          for i in range(batch)]) * 1e3
        row["mixed_step_ms"] = engine_step_seconds(plain, [greedy(f"m{i}", prompts[i], n, "memory", 0.6)
                                                           for i in range(batch)]) * 1e3
        row["round_ms"] = {}
        for k in SPEC_KS:
            e = engine(k)
            row["round_ms"][k] = engine_step_seconds(e, [greedy(f"s{i}", prompts[i], n, "memory", 0.6)
                                                         for i in range(batch)]) * 1e3
            del e
            gc.collect()
        # per-token latency at the best k, from the demo's acceptance at α 0.6
        for mode, b in beta.items():
            per_token = {k: ms / expected_tokens(b, k) for k, ms in row["round_ms"].items()}
            best = min(per_token, key=lambda k: per_token[k])
            row[mode] = {"best_k": best, "token_ms": per_token[best],
                         "over_base": per_token[best] / row["base_step_ms"],
                         "over_mixed": per_token[best] / row["mixed_step_ms"]}
        rows.append(row)
    result: dict = {"acceptance_demo_alpha_0.6": beta, "rows": rows}
    if device == "cuda":
        result["syncs"] = steps_without_sync(engine(4), 10)  # rounds: drafts, verify, acceptance
    result["greedy_tokens_identical"] = spec_tokens_identical(device)
    b1 = rows[0]
    result["targets"] = {
        "speculative per-token latency <= 0.7x base alone at batch 1, alpha 0.6 (sampled)":
            b1["sampled"]["over_base"] <= 0.7,
        "greedy tokens identical with speculation": result["greedy_tokens_identical"],
        "no implicit sync in speculative rounds": result.get("syncs", {}).get("ok", True),
    }
    return result


# -- driver -------------------------------------------------------------------------------------------------
def run_part(name: str, fn: Callable[[], dict], results: dict, deadline: float) -> None:
    if time.monotonic() > deadline:
        results[name] = {"skipped": "time budget spent"}
        return
    t0 = time.monotonic()
    try:
        results[name] = fn()
    except Exception as exc:  # noqa: BLE001 - one part failing must not hide the others' numbers
        results[name] = {"error": f"{type(exc).__name__}: {exc}",
                         "traceback": traceback.format_exc()[-4000:]}
    results[name]["seconds"] = round(time.monotonic() - t0, 1)
    print(f"[{name}] {time.monotonic() - t0:.1f} s: {json.dumps(results[name], default=str)[:600]}",
          flush=True)
    gc.collect()  # the part's engines, their KV arenas and graphs
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def print_table(results: dict) -> None:
    speed = results.get("speed", {})
    if "rows" in speed:
        print(f"\ncopy bandwidth {speed['bandwidth_GBps']:.0f} GB/s; "
              f"graph capture base {speed['capture_seconds']['base']:.1f} s, "
              f"memory {speed['capture_seconds']['memory']:.1f} s")
        print(f"{'batch':>5} {'base ms':>9} {'mixed ms':>9} {'HF ms':>9} {'base tok/s':>11} "
              f"{'mixed tok/s':>12} {'HF tok/s':>9} {'mix/base':>9} {'base/roof':>10} {'vs HF':>7}")
        for r in speed["rows"]:
            print(f"{r['batch']:>5} {r['base_step_ms']:9.2f} {r['mixed_step_ms']:9.2f} "
                  f"{r['hf_generate_step_ms']:9.2f} {r['base_tok_s']:11.0f} {r['mixed_tok_s']:12.0f} "
                  f"{r['hf_generate_tok_s']:9.0f} {r['mixed_over_base']:9.3f} "
                  f"{r['base_over_roofline']:10.2f} {r['engine_over_hf_speedup']:7.1f}")
        for target, ok in speed["targets"].items():
            print(f"  {'PASS' if ok else 'FAIL'}  {target}")
    spec = results.get("spec", {})
    if "rows" in spec:
        print(f"\nspeculative mixing: demo acceptance at alpha 0.6 "
              f"{json.dumps(spec['acceptance_demo_alpha_0.6'])}")
        print(f"{'batch':>5} {'base ms':>9} {'mixed ms':>9} "
              + " ".join(f"{'k=' + str(k) + ' ms':>9}" for k in SPEC_KS)
              + f" {'greedy ms/tok (k)':>18} {'sampled ms/tok (k)':>19} {'sampled/base':>13}")
        for r in spec["rows"]:
            rounds = " ".join(f"{r['round_ms'][k]:9.2f}" for k in SPEC_KS)
            g, sm = r["greedy"], r["sampled"]
            print(f"{r['batch']:>5} {r['base_step_ms']:9.2f} {r['mixed_step_ms']:9.2f} {rounds} "
                  f"{g['token_ms']:12.2f} ({g['best_k']}) {sm['token_ms']:13.2f} ({sm['best_k']}) "
                  f"{sm['over_base']:13.2f}")
        for target, ok in spec["targets"].items():
            print(f"  {'PASS' if ok else 'FAIL'}  {target}")
    for part in ("churn", "syncs", "overlap", "bf16"):
        print(f"{part:>8}: {json.dumps(results.get(part), default=str)[:400]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="smaller batches and fewer tokens")
    parser.add_argument("--sanitized-churn", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sanitized_churn:
        sanitized_churn()
        return
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu to check the script itself")
    out_dir = args.out or Path(os.environ.get("OUT") or ROOT / "bench" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + BUDGET_S - 60
    results: dict = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
                     "torch": torch.__version__}
    import transformers

    results["transformers"] = transformers.__version__
    with tempfile.TemporaryDirectory(prefix="memdec-gpu-acceptance-") as tmp:
        base_dir, mem_dir = real_shape_models(Path(tmp), small=device != "cuda")
        batches = [1, 8] if args.quick or device != "cuda" else [1, 8, 64]
        n = 32 if args.quick or device != "cuda" else 128
        run_part("speed", lambda: part_speed(base_dir, mem_dir, device, batches, n), results, deadline)
        run_part("spec", lambda: part_spec(base_dir, mem_dir, device, [1, 8], min(n, 64)), results, deadline)
        run_part("churn", lambda: part_churn(device), results, deadline)
        if device == "cuda":
            run_part("syncs", lambda: part_syncs(base_dir, mem_dir, device), results, deadline)
            run_part("overlap", lambda: part_overlap(base_dir, mem_dir, device, out_dir), results, deadline)
        run_part("bf16", lambda: part_bf16(base_dir, mem_dir, device), results, deadline)
    path = out_dir / "gpu_acceptance.json"
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print_table(results)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
