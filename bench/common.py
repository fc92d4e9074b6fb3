"""Shared bits of the benchmarks: machine description, tiny models, the demo's base, result files."""

from __future__ import annotations

import functools
import inspect
import json
import os
import platform
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "demo"


def machine_info() -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                               "?")
    except OSError:
        pass
    return info


def cache_kwarg(model) -> str:
    """The keyword a transformers model's forward takes its KV cache by (`past_key_values` was renamed
    `cache` in 5.x)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def tiny_models(size: str = "tiny") -> dict[str, Path]:
    """A base and a memory sharing one tokenizer, built from configs into a temp dir (no downloads)."""
    from testkit.models import build_memory, build_model, build_tokenizer

    root = Path(tempfile.mkdtemp(prefix=f"memdec-bench-{size}-"))
    tok = build_tokenizer(root / "tok")
    if size == "tiny":  # the test models' scale: per-step time is mostly engine overhead
        base = build_model(root / "base", tok, "gpt2", seed=1)
        mem = build_memory(root / "mem", tok, "mem", "llama", hidden=48, seed=3)
    else:  # "small": enough compute per step that the models, not Python, dominate on a CPU
        base = build_model(root / "base", tok, "llama", hidden=512, layers=8, max_len=1024, seed=1)
        mem = build_memory(root / "mem", tok, "mem", "qwen2", hidden=256, layers=4, max_len=1024, seed=3)
    return {"base": base, "memory": mem}


@functools.cache
def demo_base_path() -> str | None:
    """The demo's base: the SmolLM2-135M-Instruct GGUF file pinned in demo/base.json (`server.demo`),
    installed and its sha256 checked. None, after printing why, when it is not installed (or is not the
    pinned file)."""
    from server.demo import DemoNotFoundError, demo_base

    try:
        return str(demo_base(DEMO))
    except DemoNotFoundError as exc:
        print(f"demo base not installed: skipped ({exc})", flush=True)
        return None


def model_sets(labels: str) -> Iterator[tuple[str, str, str]]:
    """(label, base path, memory dir) for each comma-separated label: `tiny`/`small` are built on the spot
    from configs, `demo` is the shipped demo (its GGUF base and its first memory), skipped when either is
    absent."""
    from server.demo import demo_memories

    for label in labels.split(","):
        if label == "demo":
            base = demo_base_path()
            if base is None:
                continue
            memories = demo_memories(DEMO)
            if not memories:
                print(f"no demo memory in {DEMO / 'memories'}: skipped", flush=True)
                continue
            yield label, base, memories[0].path
        else:
            paths = tiny_models(label)
            yield label, str(paths["base"]), str(paths["memory"])


def write_result(name: str, payload: dict, out_dir: Path | None = None) -> Path:
    out_dir = out_dir or ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps({"machine": machine_info(), **payload}, indent=2) + "\n")
    return path
