"""Run `memdec serve` as a real process on a free port (tests and benchmarks)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memdec() -> list[str]:
    script = Path(sys.executable).parent / "memdec"  # the installed console script
    return [str(script)] if script.exists() else [sys.executable, "-m", "server.cli"]


class Server:
    def __init__(self, proc: subprocess.Popen, url: str, log: Path) -> None:
        self.proc, self.url, self.log = proc, url, log

    def logs(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def serve(args: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[Server]:
    port = free_port()
    full_env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **(env or {})}
    cmd = [*_memdec(), "serve", "--host", "127.0.0.1", "--port", str(port), *args]
    with running(cmd, port, log, "/ready", env=full_env, cwd=Path(__file__).resolve().parents[1]) as server:
        yield server


@contextmanager
def running(
    cmd: list[str], port: int, log: Path, ready_path: str, env: dict[str, str] | None = None,
    cwd: Path | None = None
) -> Iterator[Server]:
    """Start `cmd` (an HTTP server listening on `port`), wait until `ready_path` answers 200, stop it
    afterwards. A server that exits or is not ready within 180 s raises with its log."""
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    server = Server(proc, f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{server.logs()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready in time:\n{server.logs()}")
            try:
                if httpx.get(server.url + ready_path, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
