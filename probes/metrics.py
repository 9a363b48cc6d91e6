"""Metrics of success estimates and of routing on them: AUROC, Brier, ECE, bootstrap intervals, and the
two-backend routing frontier with APGR (as in RouteLLM), the share of dear calls needed to recover a part of
the quality gap, and the cost saved at the best single backend's accuracy."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata


def auroc(y: np.ndarray, p: np.ndarray) -> float:
    """Area under the ROC curve of scores ``p`` for 0/1 labels ``y`` (ties count a half).

    The Mann–Whitney form on average ranks (scipy), equal to scikit-learn's ``roc_auc_score`` and a twentieth of
    its time on a few hundred rows, which counts in bootstrap intervals of a thousand resamples. ValueError when
    ``y`` holds one outcome only (scikit-learn ≥ 1.8 warns and returns NaN there instead): ``bootstrap_ci`` skips
    such resamples."""
    positive = np.asarray(y) == 1
    n1 = int(positive.sum())
    n0 = len(positive) - n1
    if n1 == 0 or n0 == 0:
        raise ValueError("AUROC is undefined with one outcome only")
    ranks = rankdata(np.asarray(p, dtype=np.float64))
    return float((ranks[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def brier(y: np.ndarray, p: np.ndarray) -> float:
    """Mean squared error of probabilities ``p`` against 0/1 outcomes ``y``."""
    return float(np.mean((np.asarray(p, dtype=np.float64) - np.asarray(y, dtype=np.float64)) ** 2))


def ece(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error: |mean p − mean y| per equal-width bin of p, weighted by the bin's share.

    Bins are [0, 1/b), [1/b, 2/b), ..., [(b−1)/b, 1]; a probability of exactly 1 falls in the last one."""
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    which = np.minimum((p * bins).astype(np.int64), bins - 1)
    total = 0.0
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            total += in_bin.mean() * abs(p[in_bin].mean() - y[in_bin].mean())
    return float(total)


def bootstrap_ci(
    stat: Callable[[np.ndarray], float], n: int, *, rounds: int = 1000, seed: int = 0, level: float = 0.95,
) -> tuple[float, float]:
    """Percentile interval of ``stat(indices)`` over ``rounds`` resamples of ``range(n)`` with replacement.

    Resamples on which ``stat`` raises ValueError (e.g. AUROC with one class) are skipped."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(rounds):
        idx = rng.integers(0, n, n)
        try:
            values.append(stat(idx))
        except ValueError:
            continue
    if not values:
        return float("nan"), float("nan")
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(values, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


@dataclass(frozen=True)
class Frontier:
    """Operating points of "send to the dear backend when the cheap one's estimate is below t", one per
    distinct threshold, from no dear calls (first point) to all dear calls (last point)."""

    thresholds: np.ndarray  # t: route to dear when p_cheap < t
    dear_share: np.ndarray  # share of requests sent to the dear backend
    accuracy: np.ndarray  # share answered correctly
    cost: np.ndarray  # mean cost per request
    cheap_accuracy: float
    dear_accuracy: float

    @property
    def pgr(self) -> np.ndarray:
        """Performance gap recovered at each point: (accuracy − cheap) / (dear − cheap)."""
        gap = self.dear_accuracy - self.cheap_accuracy
        if gap == 0:
            return np.full_like(self.accuracy, np.nan)
        return (self.accuracy - self.cheap_accuracy) / gap


def routing_frontier(
    p_cheap: np.ndarray, y_cheap: np.ndarray, y_dear: np.ndarray, cost_cheap: np.ndarray | float,
    cost_dear: np.ndarray | float,
) -> Frontier:
    """Sweep the threshold over every distinct value of ``p_cheap`` (and past the largest).

    Questions with equal estimates move together, so each point is one threshold the gateway could set."""
    p = np.asarray(p_cheap, dtype=np.float64)
    n = len(p)
    yc = np.asarray(y_cheap, dtype=np.float64)
    yd = np.asarray(y_dear, dtype=np.float64)
    cc = np.broadcast_to(np.asarray(cost_cheap, dtype=np.float64), (n,))
    cd = np.broadcast_to(np.asarray(cost_dear, dtype=np.float64), (n,))
    order = np.argsort(p, kind="stable")
    ps = p[order]
    gain = np.concatenate([[0.0], np.cumsum((yd - yc)[order])])  # correct answers won by sending the k lowest
    extra = np.concatenate([[0.0], np.cumsum((cd - cc)[order])])
    # k = how many of the lowest estimates go dear; only the k at ends of tie groups are thresholds.
    ends = np.concatenate([[0], np.flatnonzero(np.diff(ps) > 0) + 1, [n]])
    # t with p < t ⇔ among the k lowest: midway between tie groups; 0 / 1 at the ends for probabilities.
    first = min(0.0, float(ps[0]))
    last = 1.0 if ps[-1] < 1.0 else float(np.nextafter(ps[-1], np.inf))
    mids = (ps[ends[1:-1] - 1] + ps[ends[1:-1]]) / 2.0
    thresholds = np.concatenate([[first], mids, [last]])
    return Frontier(
        thresholds=thresholds,
        dear_share=ends / n,
        accuracy=(yc.sum() + gain[ends]) / n,
        cost=(cc.sum() + extra[ends]) / n,
        cheap_accuracy=float(yc.mean()),
        dear_accuracy=float(yd.mean()),
    )


def apgr(frontier: Frontier) -> float:
    """Average performance gap recovered: the area under PGR against the share of dear calls (0 to 1),
    by the trapezoid rule between operating points. Random routing scores 0.5, a perfect router more."""
    return float(np.trapezoid(frontier.pgr, frontier.dear_share))


def share_to_recover(frontier: Frontier, fraction: float) -> float:
    """The smallest share of dear calls at an operating point that recovers ``fraction`` of the gap
    (1.0 when only sending everything does; NaN when the backends are equally accurate)."""
    pgr = frontier.pgr
    ok = np.flatnonzero(pgr >= fraction - 1e-12)
    return float(frontier.dear_share[ok[0]]) if ok.size else float("nan")


def cost_at_accuracy(frontier: Frontier, target: float) -> float:
    """The lowest mean cost per request at an operating point with accuracy ≥ ``target`` (NaN if none)."""
    ok = frontier.accuracy >= target - 1e-12
    return float(frontier.cost[ok].min()) if ok.any() else float("nan")


def cost_saved_at_best(frontier: Frontier, cost_cheap: float, cost_dear: float) -> dict[str, float]:
    """Cost saved against always calling the best single backend, at that backend's accuracy.

    ``cost_cheap``/``cost_dear`` are the mean costs of always calling each backend."""
    best_acc, best_cost = max(
        (frontier.cheap_accuracy, cost_cheap), (frontier.dear_accuracy, cost_dear), key=lambda t: (t[0], -t[1])
    )
    routed = cost_at_accuracy(frontier, best_acc)
    return {
        "best_single_accuracy": best_acc,
        "best_single_cost": best_cost,
        "routed_cost": routed,
        "saved_per_request": best_cost - routed,
        "saved_fraction": (best_cost - routed) / best_cost if best_cost > 0 else float("nan"),
    }
