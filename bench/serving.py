"""Serving throughput and latency: memdec (with a memory, and base alone) vs a hand-written baseline.

    python -m bench.serving [--models tiny,demo] [--concurrency 1,4,16,64] [--max-tokens 64]

A closed-loop load generator (httpx, async): C clients each send a request, wait for the whole
answer, and send the next, until `--requests-per-client` each. memdec is driven with streaming
requests (TTFT and inter-token latency are measured per token); the baseline (bench/naive_server.py:
HF `generate` per request, base only) answers whole completions, so its TTFT is its latency.
All three servers run one after the other on the same machine in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

from bench.common import model_sets, write_result
from testkit.server import serve
from testkit.text import sample_text


def prompts(n: int) -> list[str]:
    lines = [line.strip() for line in sample_text("general", 200_000).splitlines() if len(line.split()) > 12]
    return [" ".join(line.split()[:24]) for line in lines[:n]]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


async def client_loop(client: httpx.AsyncClient, url: str, body: dict, texts: list[str], stream: bool,
                      stats: dict) -> None:
    for text in texts:
        t0 = time.perf_counter()
        if stream:
            last = None
            payload = {**body, "prompt": text, "stream": True, "stream_options": {"include_usage": True}}
            async with client.stream("POST", url, json=payload) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        stats["tokens"] += chunk["usage"]["completion_tokens"]
                    if not chunk["choices"]:
                        continue
                    now = time.perf_counter()  # memdec sends a frame per engine step that produced a token
                    if last is None:
                        stats["ttft"].append(now - t0)
                    else:
                        stats["itl"].append(now - last)
                    last = now
        else:
            r = await client.post(url, json={**body, "prompt": text})
            r.raise_for_status()
            stats["ttft"].append(time.perf_counter() - t0)
            stats["tokens"] += r.json()["usage"]["completion_tokens"]
        stats["latency"].append(time.perf_counter() - t0)


async def load(url: str, body: dict, concurrency: int, per_client: int, stream: bool,
               texts: list[str]) -> dict:
    stats = {"ttft": [], "itl": [], "latency": [], "tokens": 0}
    # No keep-alive: on a loaded machine a client could reuse a connection just as the server's 5 s
    # keep-alive timer closes it (a ReadError that is neither side's fault); a fresh local connection
    # costs ~0.1 ms.
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(
            *(client_loop(client, url, body, texts[c * per_client : (c + 1) * per_client], stream, stats)
              for c in range(concurrency))
        )
        wall = time.perf_counter() - t0
    return {
        "concurrency": concurrency,
        "requests": len(stats["latency"]),
        "tokens_per_s": stats["tokens"] / wall,
        "ttft_p50_ms": pct(stats["ttft"], 0.5) * 1e3,
        "ttft_p99_ms": pct(stats["ttft"], 0.99) * 1e3,
        "itl_p50_ms": pct(stats["itl"], 0.5) * 1e3,
        "itl_p99_ms": pct(stats["itl"], 0.99) * 1e3,
        "wall_s": wall,
    }


@contextmanager
def naive_server(model: str, log: Path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count()))}
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "bench.naive_server", "--model", model,
                                 "--port", str(port)], stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def run_models(label: str, base: str, memory: str, levels: list[int], per_client: int,
               max_tokens: int) -> list[dict]:
    rows = []
    texts = prompts(max(levels) * per_client)
    body = {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    logs = Path(tempfile.mkdtemp(prefix="memdec-serving-"))
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count()))}
    args = ["--model", base, "--memory", f"mem={memory}:0.6", "--max-num-seqs", str(max(levels)),
            "--served-model-name", "base"]
    with serve(args, logs / "memdec.log", env) as server:
        for mode, extra in (("memdec+memory", {"memory": "mem", "alpha": 0.6}),
                            ("memdec base", {"memory": None})):
            asyncio.run(load(server.url + "/v1/completions", {**body, **extra}, 2, 1, True, texts))  # warm-up
            for c in levels:
                row = {"models": label, "system": mode,
                       **asyncio.run(load(server.url + "/v1/completions", {**body, **extra}, c, per_client,
                                          True, texts))}
                rows.append(row)
                print_row(row)
    with naive_server(base, logs / "naive.log") as url:
        asyncio.run(load(url + "/v1/completions", body, 2, 1, False, texts))
        for c in levels:
            row = {"models": label, "system": "naive HF generate (base)",
                   **asyncio.run(load(url + "/v1/completions", body, c, per_client, False, texts))}
            rows.append(row)
            print_row(row)
    return rows


def print_row(r: dict) -> None:
    print(
        f"{r['models']:>5} {r['system']:<26} C={r['concurrency']:<3} {r['tokens_per_s']:8.1f} tok/s  "
        f"TTFT p50 {r['ttft_p50_ms']:8.1f} p99 {r['ttft_p99_ms']:8.1f} ms  "
        f"ITL p50 {r['itl_p50_ms']:7.1f} p99 {r['itl_p99_ms']:7.1f} ms",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,demo")
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--requests-per-client", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    rows = []
    for label, base, memory in model_sets(args.models):
        rows += run_models(label, base, memory, levels, args.requests_per_client, args.max_tokens)
    summary = {}
    for label in {r["models"] for r in rows}:
        for c in levels:
            by = {r["system"]: r for r in rows if r["models"] == label and r["concurrency"] == c}
            if "memdec+memory" in by and "naive HF generate (base)" in by:
                summary[f"{label}@{c}"] = (by["memdec+memory"]["tokens_per_s"]
                                           / by["naive HF generate (base)"]["tokens_per_s"])
    for key, ratio in sorted(summary.items()):
        print(f"memdec+memory / naive tokens/s at {key}: {ratio:.2f}x")
    print(f"wrote {write_result('serving', {'rows': rows, 'memdec_memory_over_naive': summary})}")


if __name__ == "__main__":
    main()
