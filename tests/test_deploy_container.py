"""The container image for real: build the CPU image with podman, run it as Kubernetes would (models and
memories mounted read-only, a registry file, keys from the environment), and serve requests from it.

Off unless MEMDEC_CONTAINER_TEST=1 (CI's .ci/run sets it after ../shared/tools/container-setup.sh).
The first build takes minutes (dependencies from PyPI); later ones reuse layers and take under a minute.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from testkit.server import free_port

REPO = Path(__file__).resolve().parents[1]
IMAGE = os.environ.get("MEMDEC_TEST_IMAGE", "localhost/memdec:cpu-test")
BASE_IMAGE = os.environ.get("MEMDEC_BASE_IMAGE", "localhost/debian-python:bookworm")
WHEELS = Path(os.environ.get("MEMDEC_WHEELS", "/opt/wheels"))
API_KEY, ADMIN_KEY = "test-api-key", "test-admin-key"
UID = "10001"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(2700),  # a first build on a fresh machine downloads every dependency
    pytest.mark.skipif(
        os.environ.get("MEMDEC_CONTAINER_TEST") != "1",
        reason="container test is off: run `bash ../shared/tools/container-setup.sh`, then "
        "`MEMDEC_CONTAINER_TEST=1 .venv/bin/python -m pytest tests/test_deploy_container.py` (CI does)",
    ),
]


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} -> {res.returncode}\n{res.stdout}\n{res.stderr}")
    return res


@pytest.fixture(scope="module")
def image() -> str:
    if shutil.which("podman") is None:
        pytest.fail("MEMDEC_CONTAINER_TEST=1 but podman is missing: run ../shared/tools/container-setup.sh")
    if podman("image", "exists", BASE_IMAGE, check=False).returncode != 0:
        pytest.fail(f"base image {BASE_IMAGE} is missing: run ../shared/tools/container-setup.sh")
    if not any(WHEELS.glob("torch-*.whl")):
        pytest.fail(f"no torch wheel in {WHEELS} (set MEMDEC_WHEELS): "
                    "the build would pull a multi-GB CUDA torch")
    env = {**os.environ, "BASE_IMAGE": BASE_IMAGE, "WHEELS": str(WHEELS)}
    t0 = time.monotonic()
    res = subprocess.run(
        ["bash", str(REPO / "scripts" / "container-build-cpu.sh"), IMAGE],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=2400,
    )
    assert res.returncode == 0, f"image build failed:\n{res.stdout[-6000:]}\n{res.stderr[-6000:]}"
    print(f"\nimage {IMAGE} built in {time.monotonic() - t0:.0f} s")
    return IMAGE


@dataclass
class Running:
    name: str
    url: str

    def logs(self) -> str:
        res = podman("logs", self.name, check=False)
        return (res.stdout + res.stderr)[-8000:]


def start(image: str, run_args: list[str], serve_args: list[str], ready_timeout: float = 240) -> Running:
    port = free_port()
    name = f"memdec-test-{uuid.uuid4().hex[:10]}"
    # Host networking (no bridge here); the automatic health timer needs systemd, so checks run by hand.
    podman(
        "run", "-d", "--name", name, "--network", "host", "--health-interval", "disable",
        "-e", f"MEMDEC_PORT={port}", *run_args, image, "--port", str(port), *serve_args,
    )  # fmt: skip  # flag/value pairs on one line
    running = Running(name, f"http://127.0.0.1:{port}")
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        state = podman("inspect", name, "--format", "{{.State.Status}}", check=False).stdout.strip()
        if state not in ("running", "created", "configured"):
            pytest.fail(f"container {state} before ready:\n{running.logs()}")
        try:
            if httpx.get(running.url + "/ready", timeout=2).status_code == 200:
                return running
        except httpx.HTTPError:
            pass
        time.sleep(1)
    pytest.fail(f"not ready in {ready_timeout} s:\n{running.logs()}")


def stop(running: Running) -> None:
    podman("rm", "-f", "-t", "0", running.name, check=False)


@pytest.fixture(scope="module")
def mounted(image: str, tmp_path_factory: pytest.TempPathFactory, zoo) -> Iterator[Running]:
    """Run as deploy/k8s/deployment.yaml runs it: tiny models mounted as /models and /memories (PVCs), the
    registry file as /etc/memdec/registry.json (ConfigMap), keys in the environment (Secret)."""
    root = tmp_path_factory.mktemp("container")
    models, memories = root / "models", root / "memories"
    shutil.copytree(zoo.base, models / "base")
    shutil.copytree(zoo.mem_llama, memories / "med")
    shutil.copytree(zoo.mem_qwen_padded, memories / "law")
    registry = root / "registry.json"
    registry.write_text(json.dumps({"memories": [{"name": "med", "path": "/memories/med", "alpha": 0.5}]}))
    for p in [root, *root.rglob("*")]:  # the image's user is not root: it needs read access
        p.chmod(0o755 if p.is_dir() else 0o644)
    running = start(
        image,
        [
            # As the Deployment's securityContext: read-only root, writable cache and /tmp, no capabilities.
            "--read-only", "--tmpfs", "/tmp", "--tmpfs", "/var/cache/memdec", "--cap-drop", "ALL",
            "--security-opt", "no-new-privileges",
            "-v", f"{models}:/models:ro", "-v", f"{memories}:/memories:ro",
            "-v", f"{registry}:/etc/memdec/registry.json:ro",
            "-e", f"MEMDEC_API_KEY={API_KEY}", "-e", f"MEMDEC_ADMIN_KEY={ADMIN_KEY}",
        ],
        ["--model", "/models/base", "--registry", "/etc/memdec/registry.json", "--memory-root", "/memories",
         "--max-num-seqs", "4", "--shutdown-timeout", "10"],
    )  # fmt: skip  # flag/value pairs on one line
    yield running
    stop(running)


def test_image_metadata(image: str):
    info = json.loads(podman("image", "inspect", image).stdout)[0]
    assert info["Config"]["Entrypoint"] == ["memdec", "serve"]
    assert info["Config"]["User"].split(":")[0] == UID  # numeric: Kubernetes' runAsNonRoot can check it
    assert "8000/tcp" in info["Config"]["ExposedPorts"]
    assert "/health" in " ".join(info["Healthcheck"]["Test"])
    env = dict(e.split("=", 1) for e in info["Config"]["Env"])
    assert env["MEMDEC_PORT"] == "8000"


def test_completions_from_the_container(mounted: Running):
    from openai import AuthenticationError, OpenAI

    client = OpenAI(base_url=mounted.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
    ids = {m.id for m in client.models.list().data}
    assert {"base", "med"} <= ids, ids  # a directory is served by its name, never its path
    out = client.completions.create(
        model="base", prompt="The patient was given", max_tokens=6, temperature=0,
        extra_body={"memory": "med", "alpha": 0.6, "ignore_eos": True},
    )
    assert out.usage.completion_tokens == 6 and out.choices[0].finish_reason == "length"
    assert isinstance(out.choices[0].text, str) and out.choices[0].text
    base_only = client.completions.create(model="base", prompt="The patient was given", max_tokens=6,
                                          temperature=0, extra_body={"memory": None})
    assert base_only.usage.prompt_tokens == out.usage.prompt_tokens
    with pytest.raises(AuthenticationError):  # MEMDEC_API_KEY from the environment is enforced
        OpenAI(base_url=mounted.url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_hot_load_from_the_memory_volume(mounted: Running):
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    r = httpx.post(mounted.url + "/v1/memories", json={"name": "law", "path": "/memories/law"}, headers=admin,
                   timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["id"] == "law"
    # Paths outside --memory-root are refused, with an OpenAI-shaped error.
    r = httpx.post(mounted.url + "/v1/memories", json={"name": "x", "path": "/models/base"}, headers=admin,
                   timeout=60)
    assert 400 <= r.status_code < 500 and "error" in r.json(), r.text
    r = httpx.post(
        mounted.url + "/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60,
        json={"model": "law", "prompt": "The court held", "max_tokens": 3, "temperature": 0},
    )
    assert r.status_code == 200 and r.json()["memory"] == "law", r.text


def test_runs_as_non_root_and_healthcheck_passes(mounted: Running):
    assert podman("exec", mounted.name, "id", "-u").stdout.strip() == UID
    res = podman("healthcheck", "run", mounted.name, check=False)
    assert res.returncode == 0, res.stdout + res.stderr + mounted.logs()


def test_metrics_scrapable(mounted: Running):
    r = httpx.get(mounted.url + "/metrics", timeout=10)
    if r.status_code == 404:
        pytest.skip("this server does not serve /metrics yet (issue 5 wiring)")
    assert r.status_code == 200
    assert 'memdec_requests_total{endpoint="completions"' in r.text
    promtool = shutil.which("promtool")
    if promtool:
        res = subprocess.run([promtool, "check", "metrics"], input=r.content, capture_output=True, timeout=60)
        assert res.returncode == 0, res.stdout.decode() + res.stderr.decode()


def test_graceful_stop(image: str, tmp_path_factory: pytest.TempPathFactory, zoo):
    """SIGTERM (docker stop, a pod's termination) ends the server cleanly, well inside the grace period."""
    models = tmp_path_factory.mktemp("stop-models")
    shutil.copytree(zoo.base, models / "base")
    for p in [models, *models.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    running = start(image, ["-v", f"{models}:/models:ro"],
                    ["--model", "/models/base", "--shutdown-timeout", "5"])
    try:
        t0 = time.monotonic()
        podman("stop", "-t", "30", running.name, timeout=60)
        took = time.monotonic() - t0
        code = podman("inspect", running.name, "--format", "{{.State.ExitCode}}").stdout.strip()
        assert code == "0", running.logs()
        assert took < 20, f"stop took {took:.1f} s"
    finally:
        stop(running)


def test_baked_demo_serves_without_flags(image: str):
    """`docker run -p 8000:8000 IMAGE` serves the demo: only --port is passed (host networking here)."""
    if not (REPO / "demo").is_dir():
        pytest.skip("demo/ is not in the repo yet (issue 9): nothing is baked into the image")
    running = start(image, [], [], ready_timeout=600)
    try:
        cards = httpx.get(running.url + "/v1/models", timeout=30).json()["data"]
        assert {"biomed", "legal", "finance"} <= {c["id"] for c in cards}, cards
        r = httpx.post(running.url + "/v1/completions", timeout=120,
                       json={"prompt": "The patient", "max_tokens": 4, "memory": "biomed"})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1, r.text
    finally:
        stop(running)
