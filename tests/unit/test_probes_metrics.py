"""Metric functions of ``python -m probes eval`` against small hand-computed values."""

import warnings

import numpy as np
import pytest

from probes.metrics import (
    apgr,
    auroc,
    bootstrap_ci,
    brier,
    cost_at_accuracy,
    cost_saved_at_best,
    ece,
    routing_frontier,
    share_to_recover,
)


def test_auroc_counts_pairs() -> None:
    # positives 0.35 and 0.8 against negatives 0.1 and 0.4: 3 of 4 pairs ordered right
    assert auroc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    assert auroc(np.array([0, 1]), np.array([0.5, 0.5])) == pytest.approx(0.5)  # a tie counts a half


def test_brier() -> None:
    assert brier(np.array([1, 0]), np.array([0.8, 0.3])) == pytest.approx((0.04 + 0.09) / 2)


def test_ece_equal_width_bins() -> None:
    y = np.array([1, 0, 1, 1])
    p = np.array([0.15, 0.15, 0.85, 0.95])
    # bin [0.1,0.2): |0.15-0.5|·½; bin [0.8,0.9): |0.85-1|·¼; bin [0.9,1]: |0.95-1|·¼
    assert ece(y, p) == pytest.approx(0.35 * 0.5 + 0.15 * 0.25 + 0.05 * 0.25)
    assert ece(np.array([1]), np.array([1.0])) == pytest.approx(0.0)  # p = 1 falls in the last bin


def test_bootstrap_ci_is_seeded_and_brackets() -> None:
    x = np.arange(100, dtype=float)
    a = bootstrap_ci(lambda idx: float(x[idx].mean()), 100, rounds=200, seed=3)
    b = bootstrap_ci(lambda idx: float(x[idx].mean()), 100, rounds=200, seed=3)
    assert a == b
    assert a[0] < 49.5 < a[1]


def test_auroc_with_one_outcome_is_an_error_the_bootstrap_skips() -> None:
    """scikit-learn ≥ 1.8 returns NaN (with a warning) for one outcome; a NaN among the resamples would make the
    interval NaN, so ``auroc`` raises and ``bootstrap_ci`` leaves such resamples out."""
    with pytest.raises(ValueError, match="one outcome"):
        auroc(np.zeros(5), np.linspace(0, 1, 5))
    y = np.zeros(30, dtype=int)
    y[:2] = 1  # two positives in 30: some resamples draw neither
    p = np.linspace(0, 1, 30)[::-1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lo, hi = bootstrap_ci(lambda idx: auroc(y[idx], p[idx]), 30, rounds=300, seed=0)
    assert 0.9 <= lo <= hi <= 1.0


# Four questions. Sorted by the cheap model's estimate: q1 (cheap ✗, dear ✓), q2 (✓, ✗), q3 (✗, ✓), q0 (✓, ✓).
P = np.array([0.9, 0.2, 0.5, 0.7])
YC = np.array([1, 0, 1, 0])
YD = np.array([1, 1, 0, 1])


def frontier():
    return routing_frontier(P, YC, YD, 1.0, 3.0)


def test_frontier_points() -> None:
    f = frontier()
    np.testing.assert_allclose(f.dear_share, [0, 0.25, 0.5, 0.75, 1])
    np.testing.assert_allclose(f.accuracy, [0.5, 0.75, 0.5, 0.75, 0.75])
    np.testing.assert_allclose(f.cost, [1, 1.5, 2, 2.5, 3])
    np.testing.assert_allclose(f.thresholds, [0, 0.35, 0.6, 0.8, 1])
    np.testing.assert_allclose(f.pgr, [0, 1, 0, 1, 1])
    # each threshold t really sends exactly the questions with p < t
    for t, share in zip(f.thresholds, f.dear_share, strict=True):
        assert np.mean(t > P) == pytest.approx(share)


def test_apgr_trapezoid() -> None:
    assert apgr(frontier()) == pytest.approx(0.125 + 0.125 + 0.125 + 0.25)


def test_random_order_apgr_is_a_half_in_expectation() -> None:
    rng = np.random.default_rng(0)
    yc, yd = rng.integers(0, 2, 4000), np.ones(4000)
    assert apgr(routing_frontier(rng.random(4000), yc, yd, 1, 2)) == pytest.approx(0.5, abs=0.02)
    # the oracle sends the cheap model's misses first: PGR 1 from a share of (misses) on
    oracle = routing_frontier(yc.astype(float), yc, yd, 1, 2)
    assert apgr(oracle) == pytest.approx(1 - (1 - yc.mean()) / 2, abs=1e-9)


def test_share_to_recover() -> None:
    f = frontier()
    assert share_to_recover(f, 0.5) == pytest.approx(0.25)
    assert share_to_recover(f, 0.8) == pytest.approx(0.25)
    g = routing_frontier(np.array([0.1, 0.2, 0.3, 0.4]), np.array([0, 0, 1, 1]), np.array([1, 1, 1, 1]), 1, 2)
    assert share_to_recover(g, 0.5) == pytest.approx(0.25)  # PGR 0, .5, 1, 1, 1
    assert share_to_recover(g, 0.8) == pytest.approx(0.5)


def test_ties_move_together() -> None:
    f = routing_frontier(np.array([0.5, 0.5, 0.1]), np.array([1, 0, 0]), np.array([1, 1, 1]), 1, 2)
    np.testing.assert_allclose(f.dear_share, [0, 1 / 3, 1])
    np.testing.assert_allclose(f.accuracy, [1 / 3, 2 / 3, 1])


def test_cost_saved_at_best_single_accuracy() -> None:
    f = frontier()
    assert cost_at_accuracy(f, 0.75) == pytest.approx(1.5)
    saved = cost_saved_at_best(f, 1.0, 3.0)
    assert saved["best_single_accuracy"] == pytest.approx(0.75)
    assert saved["routed_cost"] == pytest.approx(1.5)
    assert saved["saved_per_request"] == pytest.approx(1.5)
    assert saved["saved_fraction"] == pytest.approx(0.5)
    assert np.isnan(cost_at_accuracy(f, 0.9))


def test_per_question_costs() -> None:
    f = routing_frontier(P, YC, YD, np.array([1.0, 1, 1, 1]), np.array([3.0, 5, 3, 3]))
    np.testing.assert_allclose(f.cost, [1, 2, 2.5, 3, 3.5])  # q1 (dear cost 5) goes first
