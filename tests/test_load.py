"""The load test of bench/load_test.py at a size that fits CI: a real `memdec serve` (tiny models) under
concurrent streaming clients on mixed memories and alpha, random disconnects and hot-swaps of a memory.

The bigger setting is the script's own default (`python -m bench.load_test`); docs/metrics.md gives the
figures.
"""

from __future__ import annotations

from bench.load_test import LoadConfig, format_summary, run

# Capacity 4 running + 6 waiting under 12 clients (n up to 2): the queue overflows (429s) while requests
# complete.
CI = LoadConfig(
    clients=12, requests=240, max_tokens=24, disconnect=0.25, perplexity=0.1, max_num_seqs=4, max_queue=6,
    swap_pause=0.1, seed=7,
)


def test_load_disconnects_and_hot_swaps(tmp_path):
    summary = run(CI, tmp_path)
    print("\n" + format_summary(summary))
    assert summary["problems"] == [], format_summary(summary) + "\n" + "\n".join(summary["error_examples"])
    outcomes = summary["outcomes"]
    # Every path of the test was taken, so the checks above were about something.
    assert outcomes.get("completed", 0) > 0 and outcomes.get("429", 0) > 0, outcomes
    assert summary["disconnects"] > 0 and summary["swaps"] >= 2, summary
    assert set(outcomes) <= {"completed", "disconnected", "429", "404_swap"}
    assert summary["statuses"].keys() <= {"200", "404", "429"}
    assert summary["gauges_after"]["memdec_requests_running"] == 0
    assert summary["gauges_after"]["memdec_requests_waiting"] == 0
