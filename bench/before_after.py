"""Run one benchmark in another checkout and in this one, alternately, and print its numbers side by side.

    python -m bench.before_after --before DIR [--repeats 3] MODULE [ARGS ...]
    e.g. python -m bench.before_after --before ../memdec-45c847a bench.engine_overhead --models demo,deep

Each round runs `python -m MODULE ARGS` in the before checkout (its own code, on this virtualenv), then in
this one, so load on the machine hits both alike. Each run writes its result to its own checkout's
bench/results/NAME.json (NAME: the module's last part). For every list of rows in the result (e.g.
`rows`, `join_leave`), rows are matched by their integer and string fields (model set, batch, context),
and each float field is printed as its median over the rounds, before and after, with after / before.
Writes bench/results/NAME_before_after.json here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from bench.common import ROOT, write_result


def run(checkout: Path, module: str, args: list[str]) -> dict:
    threads = os.environ.get("OMP_NUM_THREADS", "1")
    env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": threads}
    subprocess.run([sys.executable, "-m", module, *args], cwd=checkout, env=env, check=True)
    return json.loads((checkout / "bench" / "results" / f"{module.rsplit('.', 1)[-1]}.json").read_text())


def tables(result: dict) -> dict[str, dict[tuple, dict[str, float]]]:
    """{list name: {row key: {float field: value}}} for each list of dict rows in a result."""
    out: dict[str, dict[tuple, dict[str, float]]] = {}
    for name, rows in result.items():
        if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
            out[name] = {
                tuple((k, v) for k, v in r.items() if isinstance(v, (int, str)) and not isinstance(v, bool)):
                    {k: v for k, v in r.items() if isinstance(v, float)}
                for r in rows
            }  # fmt: skip  # a row's key and its numbers, side by side
    return out


def compare(befores: list[dict], afters: list[dict]) -> dict[str, list[dict]]:
    """Per row present in every run: each float field's median before and after, and their ratio."""
    summary: dict[str, list[dict]] = {}
    runs = [tables(r) for r in befores], [tables(r) for r in afters]
    for name, rows in runs[1][0].items():
        for key in rows:
            if not all(key in t.get(name, {}) for side in runs for t in side):
                continue
            fields = {}
            for field in rows[key]:
                before, after = (statistics.median(t[name][key][field] for t in side) for side in runs)
                fields[field] = {"before": before, "after": after,
                                 "after_over_before": after / before if before else None}
            summary.setdefault(name, []).append({"key": dict(key), "fields": fields})
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True, help="the other checkout")
    parser.add_argument("--repeats", type=int, default=3, help="rounds (one run in each checkout per round)")
    parser.add_argument("module")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    before = args.before.resolve()
    befores, afters = [], []
    for i in range(args.repeats):
        print(f"== round {i + 1}/{args.repeats}: before ({before})", flush=True)
        befores.append(run(before, args.module, args.args))
        print(f"== round {i + 1}/{args.repeats}: after ({ROOT})", flush=True)
        afters.append(run(ROOT, args.module, args.args))
    summary = compare(befores, afters)
    print(f"\nmedians of {args.repeats} rounds: before → after (after / before)")
    for name, rows in summary.items():
        print(f"{name}:")
        for row in rows:
            print("  " + ", ".join(f"{k} {v}" for k, v in row["key"].items() if not k.startswith("params")))
            for field, f in row["fields"].items():
                ratio = "" if f["after_over_before"] is None else f"  ({f['after_over_before']:.3f})"
                print(f"    {field:>26}: {f['before']:9.3f} → {f['after']:9.3f}{ratio}")
    name = args.module.rsplit(".", 1)[-1]
    path = write_result(f"{name}_before_after", {
        "module": args.module, "args": args.args, "before": str(before), "repeats": args.repeats,
        "summary": summary,
    })  # fmt: skip  # the result's fields grouped by kind
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
