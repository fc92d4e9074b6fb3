"""Adaptive K (`server.speculative.SpeculationController`): how it measures each K, picks, probes, and
its acceptance estimates."""

from __future__ import annotations

import pytest

from server.speculative import PRIOR_ACCEPTANCE, PRIOR_WEIGHT, SpeculationController, bucket, expected_tokens


def test_speculation_controller_measures_every_k_then_picks_the_best_and_probes():
    ctl = SpeculationController(3)
    seen = []
    for _ in range(4):  # K first, then each smaller k, then a plain step
        k = ctl.choose(8, [0.9] * 8)
        seen.append(k)
        ctl.observe(8, k, {3: 0.040, 2: 0.032, 1: 0.024, 0: 0.010}[k])
    assert seen == [3, 2, 1, 0]
    # β = 0.9: k=3 makes 8 * 3.44 tokens in 40 ms (688/s) against 800/s plain: plain wins.
    assert ctl.choose(8, [0.9] * 8) == 0
    ctl.observe(8, 0, 0.020)  # plain got slower (its average: 12 ms, 667/s); k=3 (688/s) is not 5% better
    assert ctl.choose(8, [0.9] * 8) == 0
    ctl.observe(8, 0, 0.020)  # 13.6 ms, 588/s: now k=3 wins
    assert ctl.choose(8, [0.9] * 8) == 3
    assert ctl.choose(8, [0.1] * 8) == 0  # at β = 0.1 no k pays (1.11 tokens per row in 24 ms at best)
    assert ctl.choose(1, [0.9]) == 3  # another batch-size bucket measures on its own
    choices = [ctl.choose(8, [0.9] * 8) for _ in range(40)]
    assert {k for k in choices if k != 3} == {0, 2}  # every PROBE_EVERY-th step: a neighbour, or a plain step
    assert SpeculationController(3, adaptive=False).choose(8, [0.0] * 8) == 3
    assert expected_tokens(0.0, 4) == 1.0 and expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)
    assert [bucket(b) for b in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 16]


def test_acceptance_estimates_start_from_the_prior_and_follow_the_tests():
    ctl = SpeculationController(4)
    assert ctl.acceptance("m") == pytest.approx(PRIOR_ACCEPTANCE)
    for _ in range(50):
        ctl.observe_acceptance("m", tests=10, passed=3)
    assert ctl.acceptance("m") == pytest.approx(0.3, abs=0.01)
    assert ctl.row_acceptance("m", passed=0.0, tests=0.0) == pytest.approx(ctl.acceptance("m"))
    assert ctl.row_acceptance("m", passed=9.0, tests=10.0) == pytest.approx(
        (9 + PRIOR_WEIGHT * 0.3) / (10 + PRIOR_WEIGHT), abs=0.01
    )
    # enough of its own tests outweigh its memory's
    assert ctl.row_acceptance("m", passed=30.0, tests=30.0) > 0.8
