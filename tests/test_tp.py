"""Tensor parallelism (`memdec serve --tensor-parallel-size 2`) on CPU: two processes over gloo.

Against `--tensor-parallel-size 1` (the same engine unsharded, itself checked against plain transformers
forwards in test_engine.py / test_e2e_server.py): greedy tokens identical and log-probs within 1e-4, with
one and several memories, requests joining and leaving (chunked prompts, mixed steps, speculative verify,
plain decode), echo and perplexity; hot-swap under TP; SIGTERM drains; a killed rank brings the server
down with an error to the client, within the bound, leaving no process behind."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, suppress
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import torch

from server.distributed import Group
from server.tp import FAILURE_EXIT_CODE, ShardedBase
from testkit.server import Server, serve

pytestmark = pytest.mark.timeout(300)

TOL = 1e-4
TIMEOUT = 5.0  # --tensor-parallel-timeout of the servers here
# Small steps so that prompts are chunked and decode rows share steps with prompt chunks (mixed steps).
FLAGS = ["--max-num-batched-tokens", "24", "--max-num-seqs", "8", "--enable-admin", "--log-level", "warning"]
PROMPT = "The patient was given a dose of the drug and the court held that the statute"


def _args(zoo: Any) -> list[str]:
    return ["--model", str(zoo.llama_base), "--memory", f"med={zoo.mem_llama}",
            "--memory", f"law={zoo.mem_qwen_padded}", *FLAGS,
            "--tensor-parallel-timeout", str(TIMEOUT)]  # fmt: skip  # flag/value pairs on one line


def _context_routed(src: Path, dst: Path) -> Path:
    """A copy of memory `src` with a router that reads context features (its EMAs are rank 0's state)."""
    import shutil

    from memories.manifest import read_manifest, write_manifest
    from memories.router import Router, RouterConfig, save_router

    shutil.copytree(src, dst)
    torch.manual_seed(0)
    entry = save_router(Router(RouterConfig.with_context((0.5, 0.9), hidden=4)), dst)
    write_manifest(dst, read_manifest(dst).replace(router=entry))
    return dst


@pytest.fixture(scope="module")
def servers(zoo: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Server]]:
    """(sharded over 2 processes, unsharded reference), started together."""
    logs = tmp_path_factory.mktemp("tp")
    cmed = _context_routed(zoo.mem_llama, logs / "cmed")
    args = [*_args(zoo), "--memory", f"cmed={cmed}"]
    with ExitStack() as stack, ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(stack.enter_context,
                               serve([*args, "--tensor-parallel-size", str(n)], logs / f"tp{n}.log"))
                   for n in (2, 1)]
        tp, ref = (f.result() for f in futures)
        yield tp, ref


def _close(a: Any, b: Any, path: str = "") -> None:
    """Equal JSON, except floats within TOL (ids and timestamps skipped)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            if k not in ("id", "created"):
                _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and path.endswith("perplexity"):  # exp(NLL): the NLL within TOL
        assert abs(math.log(a) - math.log(b)) <= TOL, f"{path}: {a} vs {b}"
    elif isinstance(a, float) and not isinstance(b, bool):
        assert abs(a - b) <= TOL, f"{path}: {a} vs {b}"
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


REQUESTS: list[tuple[str, dict[str, Any], float]] = [  # (endpoint, body, start delay in seconds)
    ("/v1/completions", {"prompt": PROMPT * 3, "memory": "med", "max_tokens": 20, "logprobs": 2}, 0.0),
    ("/v1/completions", {"prompt": "Hello", "max_tokens": 12, "logprobs": 1}, 0.0),
    ("/v1/completions",
     {"prompt": PROMPT, "memory": ["med", "law"], "alpha": [0.3, 0.4], "max_tokens": 10, "logprobs": 1}, 0.3),
    ("/v1/completions",
     {"prompt": PROMPT, "memory": "law", "max_tokens": 6, "echo": True, "logprobs": 1}, 0.6),
    ("/v1/completions",
     {"prompt": PROMPT[:30], "memory": "med", "max_tokens": 8, "speculative": False, "logprobs": 1}, 0.9),
    ("/v1/perplexity",
     {"input": PROMPT * 4, "memory": "med", "alpha": [0.2, 0.6], "context_length": 32, "logprobs": 1}, 0.2),
    # A router with context features: chunked prompt (no prefix cache), per-row EMAs on rank 0, and
    # perplexity.
    ("/v1/completions",
     {"prompt": PROMPT * 2, "memory": "cmed", "alpha": "auto", "max_tokens": 8, "logprobs": 1}, 0.4),
    ("/v1/perplexity",
     {"input": PROMPT * 4, "memory": "cmed", "alpha": "auto", "context_length": 32, "logprobs": 1}, 0.5),
]


def _run_all(server: Server) -> list[Any]:
    """Every request at once, staggered: they join and leave each other's batches."""

    def one(endpoint: str, body: dict[str, Any], delay: float) -> Any:
        time.sleep(delay)
        r = httpx.post(server.url + endpoint,
                       json={"temperature": 0, **body} if "completions" in endpoint else body, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()

    with ThreadPoolExecutor(len(REQUESTS)) as pool:
        return list(pool.map(lambda req: one(*req), REQUESTS))


def test_sharded_outputs_match_unsharded(servers):
    tp, ref = servers
    got, want = _run_all(tp), _run_all(ref)
    for g, w in zip(got, want, strict=True):
        _close(g, w)
    # echo: the prompt's log-probs came back
    assert got[3]["choices"][0]["logprobs"]["token_logprobs"][0] is None
    # The memories drafted, so the base's speculative verify ran sharded too (beside plain decode steps).
    drafted = [ln for ln in httpx.get(tp.url + "/metrics").text.splitlines()
               if ln.startswith("memdec_spec_draft_tokens_total")]
    assert any(float(ln.split()[-1]) > 0 for ln in drafted), drafted
    # The first prompt again: its full blocks are now cached, so the sharded base serves them from its prefix
    # cache.
    def hits() -> float:
        lines = httpx.get(tp.url + "/metrics").text.splitlines()
        return float(next(ln for ln in lines
                          if ln.startswith('memdec_prefix_cache_hits_total{cache="base"}')).split()[-1])

    before = hits()
    endpoint, body, _ = REQUESTS[0]
    again = [httpx.post(s.url + endpoint, json={"temperature": 0, **body}, timeout=120).json()
             for s in (tp, ref)]
    _close(*again)
    _close(again[0], got[0])
    assert hits() > before
    # The server runs as 2 processes: rank 0 and one worker (its child).
    children = psutil.Process(tp.proc.pid).children()
    assert [c.cmdline()[1:3] for c in children] == [["-m", "server.tp"]]


def test_hot_swap_under_tp(servers, zoo):
    tp, ref = servers
    body = {"prompt": PROMPT, "memory": "fin", "max_tokens": 8, "temperature": 0, "logprobs": 1}
    for s in (tp, ref):
        r = httpx.post(s.url + "/v1/memories", json={"name": "fin", "path": str(zoo.mem_gpt2)}, timeout=60)
        assert r.status_code == 200, r.text
    _close(*(httpx.post(s.url + "/v1/completions", json=body, timeout=60).json() for s in (tp, ref)))
    assert httpx.delete(tp.url + "/v1/memories/fin", timeout=30).status_code == 200
    assert httpx.post(tp.url + "/v1/completions", json=body, timeout=30).status_code == 404
    # Loaded again under the same name: it serves again, with a fresh cache view.
    assert httpx.post(tp.url + "/v1/memories", json={"name": "fin", "path": str(zoo.mem_gpt2)},
                      timeout=60).status_code == 200
    _close(*(httpx.post(s.url + "/v1/completions", json=body, timeout=60).json() for s in (tp, ref)))


def test_metrics_describe_the_whole_server(servers):
    tp, ref = servers
    text = httpx.get(tp.url + "/metrics").text
    assert 'memdec_tensor_parallel_size 2.0' in text
    assert 'memdec_tensor_parallel_size 1.0' in httpx.get(ref.url + "/metrics").text


def _stream(url: str, lines: list[str], started: threading.Event, max_tokens: int = 400) -> None:
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            "speculative": False}
    with suppress(httpx.TransportError), httpx.stream("POST", url + "/v1/completions", json=body,
                                                      timeout=120) as r:
        for line in r.iter_lines():
            lines.append(line)
            started.set()


def test_sigterm_drains_then_stops_every_rank(servers):
    tp, _ = servers
    workers = psutil.Process(tp.proc.pid).children()
    lines: list[str] = []
    started = threading.Event()
    reader = threading.Thread(target=_stream, args=(tp.url, lines, started, 60))
    reader.start()
    assert started.wait(60)
    tp.proc.send_signal(signal.SIGTERM)
    reader.join(120)
    assert tp.proc.wait(60) == 0, tp.logs()[-3000:]
    events = [line for line in lines if line]
    assert events[-1] == "data: [DONE]" and '"finish_reason":"length"' in events[-2]
    assert not [w for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.parametrize("how", ["killed", "hung"])
def test_failed_rank_fails_requests_and_exits_in_bound(zoo, tmp_path, how):
    """A worker killed (SIGKILL) or hung (SIGSTOP) mid-stream: the client gets an error, /health answers 503,
    the server exits with code 3 within the timeout plus slack, and no process is left."""
    args = ["--model", str(zoo.llama_base), "--tensor-parallel-size", "2",
            "--tensor-parallel-timeout", str(TIMEOUT),
            "--log-level", "warning"]  # fmt: skip  # flag/value pairs on one line
    with serve(args, tmp_path / f"{how}.log") as s:
        descendants = psutil.Process(s.proc.pid).children(recursive=True)
        assert len(descendants) == 1
        lines: list[str] = []
        started = threading.Event()
        reader = threading.Thread(target=_stream, args=(s.url, lines, started))
        reader.start()
        assert started.wait(60)
        if how == "killed":
            descendants[0].kill()  # rank 1, mid-stream
        else:
            descendants[0].suspend()  # alive, but never joins the next collective
        t0 = time.monotonic()
        health = set()
        while s.proc.poll() is None and time.monotonic() - t0 < TIMEOUT + 10:
            with suppress(httpx.TransportError):
                health.add(httpx.get(s.url + "/health", timeout=1).status_code)
            time.sleep(0.05)
        elapsed = time.monotonic() - t0
        if s.proc.poll() is None:
            pytest.fail(f"the server did not exit after a rank {how}:\n" + s.logs()[-3000:])
        reader.join(30)
    assert s.proc.returncode == FAILURE_EXIT_CODE, s.logs()[-3000:]
    assert elapsed < TIMEOUT + 5
    assert 503 in health, health
    events = [line for line in lines if line]
    # An error event, or a stream cut short: never a silent hang, never a complete answer.
    assert any('"error"' in e for e in events) or events[-1] != "data: [DONE]", events[-3:]
    assert not any('"finish_reason":"length"' in e for e in events)
    assert ("rank 1" if how == "killed" else "a rank hangs") in s.logs()
    for p in descendants:
        assert not p.is_running() or p.status() == psutil.STATUS_ZOMBIE


def test_a_worker_dies_with_rank_0():
    """Rank 0 killed outright (SIGKILL: no handler runs): its worker goes too, never an orphan."""
    worker = ("import sys, time; from server.distributed import die_with_parent; "
              "die_with_parent(int(sys.argv[1])); print('ready', flush=True); time.sleep(120)")
    rank0 = ("import os, subprocess, sys; "
             "w = subprocess.Popen([sys.executable, '-c', sys.argv[1], str(os.getpid())]); "
             "print(w.pid, flush=True); w.wait()")
    parent = subprocess.Popen([sys.executable, "-c", rank0, worker], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[1])
    assert parent.stdout is not None
    pid = int(parent.stdout.readline())
    assert parent.stdout.readline().strip() == "ready"
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while (psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
           and time.monotonic() < deadline):
        time.sleep(0.05)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_watchdog_sees_a_hung_forward():
    """A base forward that does not finish within the timeout is reported (the server then exits)."""
    shards = ShardedBase(Group(0, 2, torch.device("cpu"), control=None))  # type: ignore[arg-type]
    assert shards.overdue(0.2) is None
    release = threading.Event()

    def forward() -> None:
        with shards.lockstep():
            release.wait(5)
        shards.step_ended()

    t = threading.Thread(target=forward)
    t.start()
    time.sleep(0.05)
    assert shards.overdue(0.2) is None  # in flight, not late yet
    time.sleep(0.3)
    assert "hangs" in (shards.overdue(0.2) or "")
    release.set()
    t.join()
    assert shards.overdue(0.2) is None  # finished: nothing late


def test_a_failed_forward_is_fatal():
    shards = ShardedBase(Group(0, 2, torch.device("cpu"), control=None))  # type: ignore[arg-type]
    with pytest.raises(ValueError), shards.lockstep():
        raise ValueError("boom")
    assert "boom" in (shards.overdue(60) or "")
    with pytest.raises(RuntimeError, match="boom"), shards.lockstep():
        pass


def test_a_dead_worker_is_reported():
    proc = subprocess.Popen(["sh", "-c", "exit 7"])
    proc.wait()
    shards = ShardedBase(Group(0, 2, torch.device("cpu"), control=None), [proc])  # type: ignore[arg-type]
    assert "exited with code 7" in (shards.overdue(60) or "")


def test_worker_spec_round_trips():
    from server.config import EngineConfig, ModelConfig, ParallelConfig
    from server.distributed import WorkerSpec

    spec = WorkerSpec(1, 2, 1234, 99, ModelConfig("m", device="cpu"), EngineConfig(max_num_seqs=3),
                      ParallelConfig(2, 7.0))
    assert WorkerSpec.from_json(spec.to_json()) == spec
    assert json.loads(spec.to_json())["parallel"]["timeout"] == 7.0


def test_kv_heads_must_split():
    from transformers import LlamaConfig

    from server.kv import KVGeometry

    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1)
    assert KVGeometry.of(cfg, torch.float32, shards=2).num_kv_heads == 1
    with pytest.raises(ValueError, match="do not split"):
        KVGeometry.of(cfg, torch.float32, shards=4)
