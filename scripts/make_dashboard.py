"""Writes deploy/grafana/dashboards/memdec.json, the Grafana dashboard for memdec's Prometheus metrics.

    .venv/bin/python scripts/make_dashboard.py          # rewrite the JSON
    .venv/bin/python scripts/make_dashboard.py --check  # exit 1 if the committed JSON is stale

Generated rather than hand-edited so that every panel follows one layout and one set of filters; the
deploy tests check that each expression parses (promtool) and names only metrics server/metrics.py
defines.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "dashboards" / "memdec.json"
DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'instance=~"$instance"'
MEM_SEL = f'{SEL}, memory=~"$memory"'
RATE = "$__rate_interval"
QUANTILES = (0.5, 0.9, 0.99)


def quantiles(metric: str) -> list[dict[str, str]]:
    return [
        {
            "expr": f"histogram_quantile({q}, sum by (le, memory) "
                    f"(rate({metric}_bucket{{{MEM_SEL}}}[{RATE}])))",
            "legendFormat": f"p{round(q * 100)} {{{{memory}}}}",
        }
        for q in QUANTILES
    ]


class Layout:
    """Panels in rows of 24 grid units; ids in order."""

    def __init__(self) -> None:
        self.panels: list[dict[str, Any]] = []
        self.x = self.y = 0
        self.row_h = 0

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append({
            "id": len(self.panels) + 1, "type": "row", "title": title, "collapsed": False,
            "gridPos": {"x": 0, "y": self.y, "w": 24, "h": 1}, "panels": [],
        })
        self.y += 1

    def _newline(self) -> None:
        if self.x:
            self.y += self.row_h
            self.x = self.row_h = 0

    def panel(
        self,
        title: str,
        targets: list[dict[str, str]],
        *,
        unit: str,
        w: int = 8,
        h: int = 8,
        stacked: bool = False,
        description: str = "",
        kind: str = "timeseries",
    ) -> None:
        if self.x + w > 24:
            self._newline()
        custom: dict[str, Any] = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 30 if stacked else 10,
                                  "showPoints": "never", "spanNulls": False}
        if stacked:
            custom["stacking"] = {"mode": "normal", "group": "A"}
        panel: dict[str, Any] = {
            "id": len(self.panels) + 1,
            "type": kind,
            "title": title,
            "description": description,
            "datasource": DS,
            "gridPos": {"x": self.x, "y": self.y, "w": w, "h": h},
            "targets": [
                {"refId": chr(ord("A") + i), "datasource": DS, "expr": t["expr"],
                 "legendFormat": t["legendFormat"], "range": True}
                for i, t in enumerate(targets)
            ],
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {},
        }
        if kind == "timeseries":
            panel["fieldConfig"]["defaults"]["custom"] = custom
            panel["options"] = {
                "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                "tooltip": {"mode": "multi", "sort": "desc"},
            }
        else:  # stat
            panel["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                                "colorMode": "value", "graphMode": "area", "textMode": "auto"}
        self.panels.append(panel)
        self.x += w
        self.row_h = max(self.row_h, h)


def build() -> dict[str, Any]:
    lay = Layout()
    lay.row("Overview")
    lay.panel(
        "Requests running",
        [{"expr": f"sum(memdec_requests_running{{{SEL}}})", "legendFormat": "running"}],
        unit="short", w=4, h=4, kind="stat",
    )  # fmt: skip  # panel spec: title, each target, size options a line each
    lay.panel(
        "Requests waiting",
        [{"expr": f"sum(memdec_requests_waiting{{{SEL}}})", "legendFormat": "waiting"}],
        unit="short", w=4, h=4, kind="stat",
    )  # fmt: skip  # panel spec: title, each target, size options a line each
    lay.panel(
        "Memories loaded",
        [{"expr": f"max(memdec_memories_loaded{{{SEL}}})", "legendFormat": "loaded"}],
        unit="short", w=4, h=4, kind="stat",
    )  # fmt: skip  # panel spec: title, each target, size options a line each
    lay.panel(
        "GPUs per server (tensor parallel)",
        [{"expr": f"max(memdec_tensor_parallel_size{{{SEL}}})", "legendFormat": "ranks"}],
        unit="short", w=4, h=4, kind="stat",
        description="Processes each server's base is sharded over; rank 0 reports for all of them.",
    )  # fmt: skip  # panel spec: title, each target, size options a line each
    lay.panel(
        "Generated tokens/s",
        [{"expr": f"sum(rate(memdec_generation_tokens_total{{{MEM_SEL}}}[{RATE}]))",
          "legendFormat": "tokens/s"}],
        unit="short", w=4, h=4, kind="stat",
    )  # fmt: skip  # panel spec: title, each target, size options a line each
    lay.panel(
        "Requests/s",
        [{"expr": f"sum(rate(memdec_requests_total{{{SEL}}}[{RATE}]))", "legendFormat": "req/s"}],
        unit="reqps", w=4, h=4, kind="stat",
    )  # fmt: skip  # panel spec: title, each target, size options a line each
    lay.panel(
        "Error ratio (5xx)",
        [{"expr": f'sum(rate(memdec_requests_total{{{SEL}, status=~"5.."}}[{RATE}])) / '
                  f"clamp_min(sum(rate(memdec_requests_total{{{SEL}}}[{RATE}])), 1e-9)",
          "legendFormat": "5xx"}],
        unit="percentunit", w=4, h=4, kind="stat",
    )  # fmt: skip  # panel spec: title, each target, size options a line each

    lay.row("Latency per memory (memory=none is the base model alone)")
    lay.panel("Time to first token", quantiles("memdec_time_to_first_token_seconds"), unit="s",
              description="Arrival to first generated token: queue + prefill.")
    lay.panel("Inter-token latency", quantiles("memdec_inter_token_latency_seconds"), unit="s",
              description="Gap between consecutive tokens of one request (decode step time as a user "
              "sees it).")
    lay.panel("End-to-end request latency", quantiles("memdec_e2e_request_latency_seconds"), unit="s")
    lay.panel("Queue time", quantiles("memdec_request_queue_time_seconds"), unit="s",
              description="Arrival to first scheduled: grows when the batch is full (see waiting).")
    lay.panel("Prefill time", quantiles("memdec_request_prefill_time_seconds"), unit="s")
    lay.panel("Decode time", quantiles("memdec_request_decode_time_seconds"), unit="s")

    lay.row("Throughput and load")
    lay.panel(
        "Tokens/s per memory",
        [
            {"expr": f"sum by (memory) (rate(memdec_generation_tokens_total{{{MEM_SEL}}}[{RATE}]))",
             "legendFormat": "generated {{memory}}"},
            {"expr": f"sum by (memory) (rate(memdec_prompt_tokens_total{{{MEM_SEL}}}[{RATE}]))",
             "legendFormat": "prompt {{memory}}"},
        ],
        unit="short",
    )  # fmt: skip  # panel spec: title, each target, size options a line each
    lay.panel(
        "Running / waiting requests",
        [
            {"expr": f"sum(memdec_requests_running{{{SEL}}})", "legendFormat": "running"},
            {"expr": f"sum(memdec_requests_waiting{{{SEL}}})", "legendFormat": "waiting"},
            {"expr": f"avg(memdec_batch_size{{{SEL}}})", "legendFormat": "batch size (last step)"},
        ],
        unit="short",
    )  # fmt: skip  # panel spec: title, each target, size options a line each
    lay.panel(
        "Requests/s by endpoint and status",
        [{"expr": f"sum by (endpoint, status, finish_reason) (rate(memdec_requests_total{{{SEL}}}[{RATE}]))",
          "legendFormat": "{{endpoint}} {{status}} {{finish_reason}}"}],
        unit="reqps",
    )  # fmt: skip  # panel spec: title, each target, size options a line each

    lay.row("Engine step: where each millisecond goes")
    lay.panel(
        "Mean step time by phase (stacked)",
        [{"expr": f"sum by (phase) (rate(memdec_step_phase_seconds_sum{{{SEL}}}[{RATE}])) / "
                  f"sum by (phase) (rate(memdec_step_phase_seconds_count{{{SEL}}}[{RATE}]))",
          "legendFormat": "{{phase}}"}],
        unit="s", w=12, h=9, stacked=True,
        description="Per phase, the mean seconds spent in one engine step; stacked, the whole step. "
        "CUDA events on GPU, monotonic clocks on CPU.",
    )  # fmt: skip  # panel spec: title, each target, size options a line each
    lay.panel(
        "Step phase p99",
        [{"expr": f"histogram_quantile(0.99, sum by (le, phase) "
                  f"(rate(memdec_step_phase_seconds_bucket{{{SEL}}}[{RATE}])))",
          "legendFormat": "p99 {{phase}}"}],
        unit="s", w=12, h=9,
    )  # fmt: skip  # panel spec: title, each target, size options a line each

    lay.row("KV cache and CUDA graphs")
    lay.panel(
        "KV cache usage",
        [{"expr": f"max(memdec_kv_cache_usage_perc{{{SEL}}})", "legendFormat": "pages in use"}],
        unit="percentunit",
        description="Pages of the one KV arena the base and every memory share. Near 1, new requests wait "
        "and running ones may be preempted.",
    )  # fmt: skip  # panel spec: title, each target, size options a line each
    lay.panel(
        "Preemptions/s",
        [{"expr": f"sum(rate(memdec_num_preemptions_total{{{SEL}}}[{RATE}]))", "legendFormat": "preempted"}],
        unit="short",
        description="Sequences whose pages were freed to let others decode; they are recomputed later.",
    )  # fmt: skip  # panel spec: title, each target, size options a line each
    lay.panel(
        "CUDA graph capture time",
        [{"expr": f'max by (memory) (memdec_cuda_graph_capture_seconds{{{SEL}, memory=~"$memory"}})',
          "legendFormat": "{{memory}}"}],
        unit="s",
        description="Seconds to capture each model's decode graphs (memory=none is the base), at start-up "
        "or when a memory was loaded; 0 when eager (CPU, --enforce-eager).",
    )  # fmt: skip  # panel spec: title, each target, size options a line each

    lay.row("Speculative mixing (--speculative-tokens)")
    lay.panel(
        "Draft acceptance rate",
        [{"expr": f"sum by (memory) (rate(memdec_spec_accepted_tokens_total{{{MEM_SEL}}}[{RATE}])) / "
                  f"clamp_min(sum by (memory) "
                  f"(rate(memdec_spec_draft_tokens_total{{{MEM_SEL}}}[{RATE}])), 1e-9)",
          "legendFormat": "{{memory}}"}],
        unit="percentunit", w=12,
        description="Drafted tokens the base's verify kept, per memory (a round emits its kept drafts plus "
        "one token of its own). At least alpha for untransformed sampling; where drafting does not pay, the "
        "engine drafts fewer tokens or none.",
    )  # fmt: skip  # panel spec: title, each target, size options a line each
    lay.panel(
        "Drafted and accepted tokens/s",
        [
            {"expr": f"sum by (memory) (rate(memdec_spec_draft_tokens_total{{{MEM_SEL}}}[{RATE}]))",
             "legendFormat": "drafted {{memory}}"},
            {"expr": f"sum by (memory) (rate(memdec_spec_accepted_tokens_total{{{MEM_SEL}}}[{RATE}]))",
             "legendFormat": "accepted {{memory}}"},
        ],
        unit="short", w=12,
    )  # fmt: skip  # panel spec: title, each target, size options a line each

    lay.row("Prefix cache (--enable-prefix-caching)")
    lay.panel(
        "Prefix cache hit rate",
        [{"expr": f"sum by (cache) (rate(memdec_prefix_cache_hits_total{{{SEL}}}[{RATE}])) / "
                  f"clamp_min(sum by (cache) "
                  f"(rate(memdec_prefix_cache_queries_total{{{SEL}}}[{RATE}])), 1e-9)",
          "legendFormat": "{{cache}}"}],
        unit="percentunit", w=12,
        description="Prompt tokens found in the prefix cache over prompt tokens looked up (vLLM's meaning), "
        "in the base's cache and in the memories' caches. Echo (prompt log-prob) requests bypass the cache "
        "and are not counted.",
    )  # fmt: skip  # panel spec: title, each target, size options a line each
    lay.panel(
        "Prefix cache queried and hit tokens/s",
        [
            {"expr": f"sum by (cache) (rate(memdec_prefix_cache_queries_total{{{SEL}}}[{RATE}]))",
             "legendFormat": "queried {{cache}}"},
            {"expr": f"sum by (cache) (rate(memdec_prefix_cache_hits_total{{{SEL}}}[{RATE}]))",
             "legendFormat": "hit {{cache}}"},
        ],
        unit="short", w=12,
    )  # fmt: skip  # panel spec: title, each target, size options a line each

    lay.row("Memories and perplexity")
    lay.panel(
        "Memory loads",
        [{"expr": f"sum by (result) (increase(memdec_memory_loads_total{{{SEL}}}[{RATE}]))",
          "legendFormat": "{{result}}"}],
        unit="short", stacked=True,
    )  # fmt: skip  # panel spec: title, each target, size options a line each
    lay.panel(
        "Memory parameters",
        [{"expr": f'max by (memory) (memdec_memory_parameters{{{SEL}, memory=~"$memory"}})',
          "legendFormat": "{{memory}}"}],
        unit="short",
    )  # fmt: skip  # panel spec: title, each target, size options a line each
    lay.panel("Perplexity request latency", quantiles("memdec_perplexity_request_seconds"), unit="s")
    lay.panel(
        "Automatic memory choices",
        [{"expr": f"sum by (memory) (increase(memdec_auto_memory_choices_total{{{SEL}}}[{RATE}]))",
          "legendFormat": "{{memory}}"}],
        unit="short", stacked=True,
        description='The memory each `"memory": "auto"` request chose (`none`: the base alone, which also '
        "serves prompts too short to decide).",
    )  # fmt: skip  # panel spec: title, each target, size options a line each

    variables = [
        {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
         "current": {}, "hide": 0, "refresh": 1, "options": []},
        {"name": "instance", "label": "Instance", "type": "query", "datasource": DS,
         "query": {"query": "label_values(memdec_requests_running, instance)", "refId": "instance"},
         "definition": "label_values(memdec_requests_running, instance)",
         "includeAll": True, "multi": True, "allValue": ".*", "current": {}, "refresh": 2, "sort": 1,
         "hide": 0, "options": []},
        {"name": "memory", "label": "Memory", "type": "query", "datasource": DS,
         "query": {"query": "label_values(memdec_e2e_request_latency_seconds_count, memory)",
                   "refId": "memory"},
         "definition": "label_values(memdec_e2e_request_latency_seconds_count, memory)",
         "includeAll": True, "multi": True, "allValue": ".*", "current": {}, "refresh": 2, "sort": 1,
         "hide": 0, "options": []},
    ]  # fmt: skip  # the variables laid out line for line alike
    return {
        "uid": "memdec-overview",
        "title": "memdec",
        "description": ("memdec serving: latency per memory, throughput, queue, engine step phases, "
                        "memory loads."),
        "tags": ["memdec", "llm"],
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "annotations": {"list": []},
        "links": [],
        "templating": {"list": variables},
        "panels": lay.panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with the committed file instead of writing")
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        if not OUT.is_file() or OUT.read_text(encoding="utf-8") != text:
            print(f"{OUT} is stale: run scripts/make_dashboard.py", file=sys.stderr)
            return 1
        return 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT} ({len(build()['panels'])} panels)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
