"""Load test: concurrent streaming clients, random disconnects and memory hot-swaps against a real server.

    python -m bench.load_test [--clients 32] [--requests 1000] [--max-tokens 64] [--disconnect 0.2]
                              [--perplexity 0.1] [--max-num-seqs 16] [--max-queue 16] [--swap-pause 0.2]
                              [--models tiny|small] [--seed 0] [--max-rss-growth-mb 32] [--json PATH]

It starts `memdec serve` as a real process on tiny models built from configs (a base and one memory
directory, nothing downloaded), with the memory loaded at start-up as `mem` and an admin key. Then:

- `--clients` concurrent clients (httpx, async, closed loop) send `--requests` requests in all, each
  streamed (`stream: true`, usage included) with a random memory (none, `mem`, or `swap`), a random
  alpha (the memory's default, 0, 1 or uniform), n of 1 or 2, and 1..`--max-tokens` tokens with EOS
  ignored; a `--perplexity` fraction are /v1/perplexity requests instead. A `--disconnect` fraction
  of the streams hang up after 1-3 frames.
- Meanwhile one admin client loads the same memory directory as `swap` and unloads it again, over
  and over (`--swap-pause` seconds loaded and unloaded), so that requests race the swap.
- A warm-up round (2 requests per client, with swaps) runs first; the server's RSS (psutil) is read
  after it and after the main round, both times with the engine idle and `swap` unloaded.

Every request must end in one of: completed (every choice finished with `length`, exactly the tokens
asked for, then `[DONE]`), hung up by the client on purpose, 429 with Retry-After (clients then back
off 50-250 ms rather than the full Retry-After, to keep the queue under pressure), or a clean
OpenAI-shaped 404 for `swap` while it is unloaded. Afterwards the `memdec_requests_running` and
`memdec_requests_waiting` gauges of /metrics must return to 0, the server's own request counter must
hold no 5xx, its log no traceback, and RSS may grow by at most `--max-rss-growth-mb`. The summary
(requests, concurrency, disconnects, swaps, outcomes and errors by status, RSS before/after) is
printed and written to `--json` (default bench/results/load_test.json); the exit code is 1 when any
check failed. tests/test_load.py runs a CI-sized round through `run()`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

from bench.common import tiny_models, write_result
from testkit.server import serve
from testkit.text import sample_text

ADMIN_KEY = "load-test-admin"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
MEMORIES = (None, "mem", "swap")
HANG_UP_TOKENS = 300  # max_tokens of the streams a client will leave (+ a prompt of <= ~150 tokens < 512)


@dataclass(frozen=True)
class LoadConfig:
    clients: int = 32
    requests: int = 1000
    max_tokens: int = 64
    disconnect: float = 0.2  # fraction of streams the client hangs up on
    perplexity: float = 0.1  # fraction of requests that are /v1/perplexity
    max_num_seqs: int = 16
    max_queue: int = 16
    swap_pause: float = 0.2  # seconds `swap` stays loaded, then unloaded, per cycle
    models: str = "tiny"
    seed: int = 0
    max_rss_growth_mb: float = 32.0


@dataclass
class Tally:
    outcomes: Counter = field(default_factory=Counter)  # completed, disconnected, 429, 404_swap, error
    statuses: Counter = field(default_factory=Counter)  # HTTP status of every answer
    errors: Counter = field(default_factory=Counter)  # what went wrong, by kind
    swaps: int = 0  # load + unload cycles of `swap`
    swap_conflicts: int = 0  # loads refused with 409 while the previous `swap` was still draining
    tokens: int = 0  # completion tokens streamed by completed requests
    ttft: list[float] = field(default_factory=list)
    examples: list[str] = field(default_factory=list)  # the first few errors, in full

    def error(self, kind: str, detail: str) -> None:
        self.outcomes["error"] += 1
        self.errors[kind] += 1
        if len(self.examples) < 10:
            self.examples.append(f"{kind}: {detail[:500]}")


def _prompts(n: int, rng: random.Random) -> list[str]:
    lines = [line.split() for line in sample_text("general", 100_000).splitlines() if len(line.split()) > 8]
    return [" ".join(rng.choice(lines)[: rng.randint(3, 24)]) for _ in range(n)]


def _is_clean_404(r: httpx.Response) -> bool:
    try:
        err = r.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return set(err) == {"message", "type", "param", "code"} and err["param"] in ("memory", "model")


async def _completion(client: httpx.AsyncClient, body: dict, hang_up_after: int | None, tally: Tally) -> None:
    n, max_tokens = body["n"], body["max_tokens"]
    t0 = time.perf_counter()
    async with client.stream("POST", "/v1/completions", json=body) as r:
        tally.statuses[r.status_code] += 1
        if r.status_code != 200:
            await r.aread()
            _refused(r, body.get("memory"), tally)
            return
        frames, finished, usage, first = 0, {}, None, None
        async for line in r.aiter_lines():
            if not line:
                continue
            if not line.startswith("data: "):
                tally.error("bad frame", line)
                return
            if line == "data: [DONE]":
                break
            chunk = json.loads(line[6:])
            if "error" in chunk:
                tally.error("error frame", line)
                return
            if first is None:
                first = time.perf_counter() - t0
            for c in chunk["choices"]:
                if c["finish_reason"] is not None:
                    finished[c["index"]] = c["finish_reason"]
            usage = chunk.get("usage") or usage
            frames += 1
            if hang_up_after is not None and frames >= hang_up_after:
                tally.outcomes["disconnected"] += 1  # leaving the block closes the connection mid-stream
                return
        else:
            tally.error("no [DONE]", f"{frames} frames")
            return
    if (finished != dict.fromkeys(range(n), "length") or usage is None
            or usage["completion_tokens"] != n * max_tokens):
        tally.error("incomplete answer", f"finish {finished}, usage {usage}, asked n={n} x {max_tokens}")
        return
    tally.outcomes["completed"] += 1
    tally.tokens += usage["completion_tokens"]
    if first is not None:
        tally.ttft.append(first)


async def _perplexity(client: httpx.AsyncClient, body: dict, tally: Tally) -> None:
    r = await client.post("/v1/perplexity", json=body)
    tally.statuses[r.status_code] += 1
    if r.status_code != 200:
        _refused(r, body.get("memory"), tally)
        return
    data = r.json()
    if not (data["overall"]["num_tokens"] > 0 and data["overall"]["perplexity"] > 0):
        tally.error("bad perplexity", r.text)
        return
    tally.outcomes["completed"] += 1


def _refused(r: httpx.Response, memory: str | None, tally: Tally) -> None:
    if r.status_code == 429:
        if r.headers.get("retry-after", "").isdigit():
            tally.outcomes["429"] += 1
        else:
            tally.error("429 without Retry-After", r.text)
    elif r.status_code == 404 and memory == "swap" and _is_clean_404(r):
        tally.outcomes["404_swap"] += 1
    else:
        tally.error(f"HTTP {r.status_code}", r.text)


def _request_body(rng: random.Random, prompt: str, cfg: LoadConfig) -> tuple[str, dict, int | None]:
    """(endpoint, body, frames after which the client hangs up or None)."""
    memory = rng.choice(MEMORIES)
    body: dict[str, Any] = {}
    if memory is not None:
        body["memory"] = memory
        alpha = rng.choice([None, 0.0, 1.0, round(rng.random(), 3)])
        if alpha is not None:
            body["alpha"] = alpha
    if rng.random() < cfg.perplexity:
        return "perplexity", {**body, "input": prompt + " " + prompt}, None
    body.update(
        prompt=prompt, n=rng.choice([1, 1, 1, 2]), max_tokens=rng.randint(1, cfg.max_tokens), ignore_eos=True,
        temperature=rng.choice([0.0, 0.8]), seed=rng.randrange(1 << 30), stream=True,
        stream_options={"include_usage": True},
    )
    hang_up = None
    if rng.random() < cfg.disconnect:
        # Long enough that it is still generating when the client leaves: the server must abort it.
        hang_up, body["max_tokens"] = rng.randint(1, 3), HANG_UP_TOKENS
    return "completions", body, hang_up


async def _client(client: httpx.AsyncClient, jobs: asyncio.Queue, cfg: LoadConfig, tally: Tally,
                  rng: random.Random) -> None:
    while True:
        try:
            prompt = jobs.get_nowait()
        except asyncio.QueueEmpty:
            return
        endpoint, body, hang_up = _request_body(rng, prompt, cfg)
        refused = tally.outcomes["429"]
        try:
            if endpoint == "perplexity":
                await _perplexity(client, body, tally)
            else:
                await _completion(client, body, hang_up, tally)
        except httpx.HTTPError as exc:
            tally.error(type(exc).__name__, str(exc))
        if tally.outcomes["429"] > refused:
            await asyncio.sleep(rng.uniform(0.05, 0.25))


async def _swapper(client: httpx.AsyncClient, memory_dir: str, pause: float, stop: asyncio.Event,
                   tally: Tally) -> None:
    """Load and unload `swap` until told to stop; always ends unloaded."""
    while not stop.is_set():
        r = await client.post("/v1/memories", json={"name": "swap", "path": memory_dir}, headers=ADMIN)
        if r.status_code == 409:  # the previous `swap` still drains its requests: it is freed at their end
            tally.swap_conflicts += 1
            await asyncio.sleep(pause / 4)
            continue
        if r.status_code != 200:
            tally.error(f"swap load HTTP {r.status_code}", r.text)
            return
        await asyncio.sleep(pause)
        r = await client.delete("/v1/memories/swap", headers=ADMIN)
        if r.status_code != 200:
            tally.error(f"swap unload HTTP {r.status_code}", r.text)
            return
        tally.swaps += 1
        await asyncio.sleep(pause)


async def _round(url: str, cfg: LoadConfig, n_requests: int, memory_dir: str,
                 rng: random.Random) -> tuple[Tally, float]:
    tally = Tally()
    jobs: asyncio.Queue = asyncio.Queue()
    for p in _prompts(n_requests, rng):
        jobs.put_nowait(p)
    limits = httpx.Limits(max_connections=cfg.clients + 4, max_keepalive_connections=cfg.clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        stop = asyncio.Event()
        swapper = asyncio.ensure_future(_swapper(client, memory_dir, cfg.swap_pause, stop, tally))
        t0 = time.perf_counter()
        seeds = [rng.randrange(1 << 30) for _ in range(cfg.clients)]
        await asyncio.gather(*(_client(client, jobs, cfg, tally, random.Random(s)) for s in seeds))
        elapsed = time.perf_counter() - t0
        stop.set()
        await swapper
    return tally, elapsed


@dataclass
class Scrape:
    gauges: dict[str, float]
    requests: Counter  # memdec_requests_total as {(endpoint, status, finish_reason): n}
    generation_tokens: float  # memdec_generation_tokens_total, all memories

    @property
    def idle(self) -> bool:
        return (self.gauges.get("memdec_requests_running") == 0
                and self.gauges.get("memdec_requests_waiting") == 0)


def _scrape(url: str) -> Scrape:
    gauges, requests, generated = {}, Counter(), 0.0
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        for sample in family.samples:
            if sample.name in ("memdec_requests_running", "memdec_requests_waiting",
                               "memdec_memories_loaded"):
                gauges[sample.name] = sample.value
            elif sample.name == "memdec_requests_total" and sample.value:
                labels = sample.labels
                requests[(labels["endpoint"], labels["status"], labels["finish_reason"])] = int(sample.value)
            elif sample.name == "memdec_generation_tokens_total":
                generated += sample.value
    return Scrape(gauges, requests, generated)


def _wait_idle(url: str, timeout: float = 60) -> Scrape:
    deadline = time.monotonic() + timeout
    while not (scrape := _scrape(url)).idle and time.monotonic() < deadline:
        time.sleep(0.1)
    return scrape


def _rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, round(q * (len(values) - 1)))], 4)


def run(cfg: LoadConfig, workdir: Path | None = None) -> dict[str, Any]:
    """Start a server, run the warm-up and the main round, and return the summary with its `problems`."""
    workdir = workdir or Path(tempfile.mkdtemp(prefix="memdec-load-"))
    models = tiny_models(cfg.models)
    memory_dir = str(models["memory"])
    args = [
        "--model", str(models["base"]), "--memory", f"mem={memory_dir}", "--admin-key", ADMIN_KEY,
        "--memory-root", str(Path(memory_dir).parent), "--max-num-seqs", str(cfg.max_num_seqs),
        "--max-queue", str(cfg.max_queue), "--log-level", "warning",
    ]  # fmt: skip  # flag/value pairs on one line
    rng = random.Random(cfg.seed)
    with serve(args, workdir / "server.log") as server:
        pid = server.proc.pid
        warm, _ = asyncio.run(_round(server.url, cfg, 2 * cfg.clients, memory_dir, rng))
        idle_before = _wait_idle(server.url)
        rss_before = _rss_mb(pid)
        tally, elapsed = asyncio.run(_round(server.url, cfg, cfg.requests, memory_dir, rng))
        idle_after = _wait_idle(server.url)
        rss_after = _rss_mb(pid)
        health = httpx.get(server.url + "/health", timeout=30).status_code
        memories = sorted(c["id"] for c in httpx.get(server.url + "/v1/memories", timeout=30).json()["data"])
        log = server.logs()
    # The server's own accounting of the main round (its clients' endpoints; the swapper's are "memories").
    server_counts = Counter(
        {k: n - idle_before.requests[k] for k, n in idle_after.requests.items() if k[0] != "memories"}
    )
    server_counts = +server_counts  # drop zeros
    server_statuses: Counter = Counter()
    for (_, status, _), n in server_counts.items():
        server_statuses[int(status)] += n
    server_aborts = sum(n for (_, _, reason), n in server_counts.items() if reason == "abort")
    # Tokens the engine generated beyond what completed streams received: the aborted requests' (a request
    # that is not aborted when its client leaves runs on to its HANG_UP_TOKENS x n).
    after_hang_up = idle_after.generation_tokens - idle_before.generation_tokens - tally.tokens
    per_hang_up = after_hang_up / tally.outcomes["disconnected"] if tally.outcomes["disconnected"] else 0.0
    server_5xx = sum(n for (_, status, _), n in idle_after.requests.items() if status.startswith("5"))
    summary: dict[str, Any] = {
        "config": asdict(cfg),
        "requests": cfg.requests,
        "concurrency": cfg.clients,
        "seconds": round(elapsed, 2),
        "outcomes": dict(tally.outcomes),
        "disconnects": tally.outcomes["disconnected"],
        "server_aborts": server_aborts,
        "tokens_per_aborted_request": round(per_hang_up, 1),
        "swaps": tally.swaps,
        "swap_conflicts_409": tally.swap_conflicts,
        "statuses": {str(k): v for k, v in sorted(tally.statuses.items())},
        "server_statuses": {str(k): v for k, v in sorted(server_statuses.items())},
        "server_5xx": server_5xx,
        "errors": dict(tally.errors),
        "error_examples": tally.examples + warm.examples,
        "warmup_errors": dict(warm.errors),
        "completion_tokens": tally.tokens,
        "tokens_per_s": round(tally.tokens / elapsed, 1) if elapsed else None,
        "ttft_p50_s": _pct(tally.ttft, 0.5),
        "ttft_p95_s": _pct(tally.ttft, 0.95),
        "gauges_before": idle_before.gauges,
        "gauges_after": idle_after.gauges,
        "rss_mb_before": round(rss_before, 1),
        "rss_mb_after": round(rss_after, 1),
        "rss_growth_mb": round(rss_after - rss_before, 1),
        "health_after": health,
        "memories_after": memories,
    }
    problems = []
    if tally.errors or warm.errors:
        problems.append(f"requests that neither completed nor got 429/clean 404: "
                        f"{dict(tally.errors + warm.errors)}")
    if sum(tally.outcomes.values()) != cfg.requests:
        problems.append(f"{cfg.requests} requests sent, {sum(tally.outcomes.values())} accounted for")
    for when, scrape in (("after the warm-up", idle_before), ("after the run", idle_after)):
        if not scrape.idle:
            problems.append(f"queue gauges did not return to 0 {when}: {scrape.gauges}")
    if server_5xx:
        problems.append(f"the server counted {server_5xx} 5xx answers")
    if server_statuses != tally.statuses:
        problems.append(f"statuses seen by clients {dict(tally.statuses)} != "
                        f"counted by the server {dict(server_statuses)}")
    if server_aborts != tally.outcomes["disconnected"]:
        problems.append(f"{tally.outcomes['disconnected']} client hang-ups but "
                        f"{server_aborts} requests aborted by the server")
    if per_hang_up > HANG_UP_TOKENS / 2:
        problems.append(f"aborted requests generated {per_hang_up:.0f} tokens each: "
                        f"were they aborted at all?")
    if idle_after.gauges.get("memdec_memories_loaded") != len(memories) or memories != ["mem"]:
        problems.append(f"memories after the run: {memories}, "
                        f"gauge {idle_after.gauges.get('memdec_memories_loaded')}")
    if health != 200:
        problems.append(f"/health is {health} after the run")
    if "Traceback" in log:
        problems.append("the server log holds a traceback:\n" + log[log.index("Traceback") - 200 :][:4000])
    if rss_after - rss_before > cfg.max_rss_growth_mb:
        problems.append(f"RSS grew by {rss_after - rss_before:.1f} MB (> {cfg.max_rss_growth_mb})")
    if cfg.requests >= 4 * cfg.clients and (not tally.swaps or not tally.outcomes["completed"]):
        problems.append(f"the run exercised too little: {tally.swaps} swaps, "
                        f"{tally.outcomes['completed']} completed")
    summary["problems"] = problems
    return summary


def format_summary(s: dict[str, Any]) -> str:
    lines = [
        f"requests {s['requests']} at concurrency {s['concurrency']} in {s['seconds']} s "
        f"({s['completion_tokens']} tokens streamed, {s['tokens_per_s']} tok/s, "
        f"TTFT p50 {s['ttft_p50_s']} s, "
        f"p95 {s['ttft_p95_s']} s)",
        f"outcomes {s['outcomes']}",
        f"disconnects {s['disconnects']}, swaps {s['swaps']} (409 while draining: {s['swap_conflicts_409']})",
        f"HTTP statuses {s['statuses']}, errors {s['errors'] or 'none'}",
        f"server: {s['server_aborts']} requests aborted "
        f"({s['tokens_per_aborted_request']} tokens generated per "
        f"aborted request, of {HANG_UP_TOKENS}+ asked), statuses {s['server_statuses']}, "
        f"5xx {s['server_5xx']}; "
        f"gauges after: running {s['gauges_after'].get('memdec_requests_running')}, "
        f"waiting {s['gauges_after'].get('memdec_requests_waiting')}",
        f"RSS {s['rss_mb_before']} MB -> {s['rss_mb_after']} MB ({s['rss_growth_mb']:+} MB)",
    ]
    lines += [f"PROBLEM: {p}" for p in s["problems"]] or ["all checks passed"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = LoadConfig()
    for name, value in asdict(d).items():
        p.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    p.add_argument("--json", type=Path, default=None,
                   help="where to write the summary (default bench/results/)")
    args = vars(p.parse_args(argv))
    out = args.pop("json")
    summary = run(LoadConfig(**args))
    print(format_summary(summary))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"summary: {out}")
    else:
        print(f"summary: {write_result('load_test', summary)}")
    return 1 if summary["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
