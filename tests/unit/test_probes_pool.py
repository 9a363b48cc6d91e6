"""Routing a pool of N backends offline: every vectorised decision equals router.policy's, and the summary
figures (best single, random mixes, cost at a target accuracy) are the ones worked out by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from probes.pool import (
    MARGINS,
    Points,
    cost_at,
    mix_cost_at,
    oracle_choices,
    pool_report,
    threshold_choices,
    threshold_radius,
    utility_choices,
    utility_radius,
)
from router.policy import Option, Rule, choose_by_threshold, choose_by_utility, decision_radius

NAMES = ["a", "b", "c", "d"]


def _random(n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    p = np.round(rng.uniform(size=(n, 4)), 1)  # ties on purpose
    cost = np.tile([1.0, 1.0, 4.0, 4.0], (n, 1)) * rng.uniform(0.5, 1.5, size=(n, 1))
    y = (rng.uniform(size=(n, 4)) < p).astype(np.float64)
    return p, y, cost


@pytest.mark.parametrize("threshold", [0.0, 0.35, 0.7, 1.01])
@pytest.mark.parametrize("fallback", [None, 2])
def test_threshold_choices_equal_the_gateway_policy(threshold: float, fallback: int | None) -> None:
    p, _, cost = _random()
    got = threshold_choices(p, cost, NAMES, threshold, fallback)
    for i in range(len(p)):
        options = [Option(n, float(cost[i, j]), float(p[i, j])) for j, n in enumerate(NAMES)]
        want = choose_by_threshold(options, threshold, None if fallback is None else NAMES[fallback]).backend
        assert NAMES[got[i]] == want


@pytest.mark.parametrize("cost_weight", [0.0, 0.1, 0.5, 3.0])
def test_utility_choices_equal_the_gateway_policy(cost_weight: float) -> None:
    p, _, cost = _random(seed=1)
    got = utility_choices(p, cost, NAMES, cost_weight)
    for i in range(len(p)):
        options = [Option(n, float(cost[i, j]), float(p[i, j])) for j, n in enumerate(NAMES)]
        assert NAMES[got[i]] == choose_by_utility(options, cost_weight).backend


@pytest.mark.parametrize("margin", [0.0, 0.05, 0.3])
@pytest.mark.parametrize("cost_weight", [0.0, 0.5])
def test_utility_choices_with_a_margin_equal_the_gateway_policy(cost_weight: float, margin: float) -> None:
    p, _, cost = _random(seed=2)
    got = utility_choices(p, cost, NAMES, cost_weight, fallback=1, margin=margin)
    for i in range(len(p)):
        options = [Option(n, float(cost[i, j]), float(p[i, j])) for j, n in enumerate(NAMES)]
        assert NAMES[got[i]] == choose_by_utility(options, cost_weight, NAMES[1], margin).backend


def test_oracle_takes_the_cheapest_right_backend() -> None:
    y = np.array([[0, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=float)
    cost = np.tile([2.0, 1.0, 3.0, 4.0], (3, 1))
    assert oracle_choices(y, cost, NAMES).tolist() == [1, 1, 1]


def test_mix_and_cost_at_targets() -> None:
    acc, cost = np.array([0.6, 0.9]), np.array([1.0, 3.0])
    assert mix_cost_at(acc, cost, 0.75) == pytest.approx(2.0)  # half of each
    assert mix_cost_at(acc, cost, 0.5) == pytest.approx(1.0)
    assert np.isnan(mix_cost_at(acc, cost, 0.95))
    pts = Points(np.arange(3.0), np.array([0.6, 0.8, 0.9]), np.array([1.0, 1.5, 2.5]), np.zeros((3, 2)))
    assert cost_at(pts, 0.8) == 1.5 and np.isnan(cost_at(pts, 0.95))


def test_pool_report_with_perfect_estimates(tmp_path: Path) -> None:
    p, y, cost = _random(n=400, seed=2)
    report = pool_report(NAMES, y, cost, {"perfect": y.copy(), "noise": p}, out_dir=tmp_path)
    best = report["always_best"]
    perfect = report["policies"]["perfect"]
    assert perfect["utility"]["max_accuracy"] == pytest.approx(report["oracle"]["accuracy"])
    assert perfect["argmax_p"]["reaches_best_single"]
    assert perfect["threshold"]["cost_at_100pct_of_best"] < best["cost_per_request"]
    assert (tmp_path / report["plot"]).stat().st_size > 1000
    held = report["policies"]["noise"]["argmax_p_margin"]
    assert held["toward"] == best["backend"] and [m["margin"] for m in held["margins"]] == list(MARGINS)
    best_index = NAMES.index(best["backend"])
    for m in held["margins"]:  # each margin's accuracy is that of the gateway's own choices
        choice = utility_choices(p, cost, NAMES, 0.0, best_index, m["margin"])
        assert m["accuracy"] == pytest.approx(y[np.arange(len(y)), choice].mean(), abs=1e-4)
    reached = [m["margin"] for m in held["margins"] if m["accuracy"] >= best["accuracy"] - 1e-12]
    assert held["smallest_reaching_best_single"] == (reached[0] if reached else None)


@pytest.mark.parametrize("threshold", [0.0, 0.35, 0.7, 1.01])
@pytest.mark.parametrize("fallback", [None, 0, 2])
def test_threshold_radius_equals_the_gateway_policy(threshold: float, fallback: int | None) -> None:
    p, _, cost = _random(seed=3)
    p = np.where(np.random.default_rng(4).uniform(size=p.shape) < 0.5, p, p + 0.05)  # ties and near ties
    choice, radius = threshold_radius(p, cost, NAMES, threshold, fallback)
    rule = Rule("threshold", threshold=threshold, fallback=None if fallback is None else NAMES[fallback])
    for i in range(len(p)):
        options = [Option(n, float(cost[i, j]), float(p[i, j])) for j, n in enumerate(NAMES)]
        decision, r = decision_radius(options, rule)
        assert NAMES[choice[i]] == decision.backend
        assert radius[i] == pytest.approx(r, abs=1e-12)


@pytest.mark.parametrize(("cost_weight", "fallback", "margin"),
                         [(0.0, None, 0.0), (0.5, None, 0.0), (0.0, 1, 0.05), (0.5, 3, 0.2), (3.0, 0, 0.1)])
def test_utility_radius_equals_the_gateway_policy(cost_weight: float, fallback: int | None, margin: float) -> None:
    p, _, cost = _random(seed=5)
    choice, radius = utility_radius(p, cost, NAMES, cost_weight, fallback, margin)
    rule = Rule("utility", cost_weight=cost_weight, fallback=None if fallback is None else NAMES[fallback],
                margin=margin)
    for i in range(len(p)):
        options = [Option(n, float(cost[i, j]), float(p[i, j])) for j, n in enumerate(NAMES)]
        decision, r = decision_radius(options, rule)
        assert NAMES[choice[i]] == decision.backend
        assert radius[i] == pytest.approx(r, abs=1e-12)


def test_one_backend_is_always_clear() -> None:
    p, cost = np.array([[0.2], [0.9]]), np.ones((2, 1))
    assert np.isinf(threshold_radius(p, cost, ["a"], 0.5)[1]).all()
    assert np.isinf(utility_radius(p, cost, ["a"], 0.5)[1]).all()
