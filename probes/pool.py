"""Routing among N backends on held-out success estimates: the accuracy/cost frontier of the gateway's two
policies (``router.policy``: the cheapest backend whose estimate clears a threshold, and argmax p − λ·cost/max
cost), against always one backend, random mixes of two, and an oracle.

Everything is vectorised over questions; ``tests/unit/test_probes_pool.py`` checks each operating point
against ``router.policy`` itself, the one home of the rules.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes


@dataclass(frozen=True)
class Points:
    """Operating points of one policy: a knob value each, with the mean accuracy and cost it gives."""

    knob: np.ndarray
    accuracy: np.ndarray
    cost: np.ndarray
    shares: np.ndarray  # (points, backends): share of requests sent to each backend


# policy.margin values the pool report tries: argmax p, held to the best single backend unless beaten by this
MARGINS = (0.01, 0.02, 0.05, 0.1, 0.2)


def _outcome(choice: np.ndarray, y: np.ndarray, cost: np.ndarray) -> tuple[float, float, np.ndarray]:
    rows = np.arange(len(choice))
    shares = np.bincount(choice, minlength=y.shape[1]) / len(choice)
    return float(y[rows, choice].mean()), float(cost[rows, choice].mean()), shares


def _points(knobs: Sequence[float], choices: Sequence[np.ndarray], y: np.ndarray, cost: np.ndarray) -> Points:
    out = [_outcome(c, y, cost) for c in choices]
    return Points(np.asarray(knobs, dtype=np.float64), np.array([o[0] for o in out]), np.array([o[1] for o in out]),
                  np.stack([o[2] for o in out]))


def _rank(primary: np.ndarray, secondary: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """Per row, backend indices ordered by (primary, secondary, name) ascending."""
    name_rank = np.argsort(np.argsort(np.array(names, dtype=object)))
    keys = (np.broadcast_to(name_rank, primary.shape), secondary, primary)
    return np.lexsort(keys, axis=1)


def threshold_choices(p: np.ndarray, cost: np.ndarray, names: Sequence[str], threshold: float,
                      fallback: int | None = None) -> np.ndarray:
    """``choose_by_threshold`` for every row: the cheapest backend with p ≥ threshold, else the fallback, else
    the highest p."""
    by_cost = _rank(cost, -p, names)
    clears = np.take_along_axis(p, by_cost, axis=1) >= threshold
    first = by_cost[np.arange(len(p)), np.argmax(clears, axis=1)]
    other = np.full(len(p), fallback) if fallback is not None else _rank(-p, cost, names)[:, 0]
    return np.where(clears.any(axis=1), first, other)


def utility_choices(p: np.ndarray, cost: np.ndarray, names: Sequence[str], cost_weight: float,
                    fallback: int | None = None, margin: float = 0.0) -> np.ndarray:
    """``choose_by_utility`` for every row: argmax p − λ·cost/max cost, ties to the cheaper, then by name; with
    ``margin``, ``fallback`` keeps every row whose best utility beats its own by ``margin`` or less."""
    top = cost.max(axis=1, keepdims=True)
    top = np.where(top > 0, top, 1.0)
    utility = p - cost_weight * cost / top
    choice = _rank(-utility, cost, names)[:, 0]
    if fallback is None or margin <= 0:
        return choice
    rows = np.arange(len(p))
    return np.where(utility[rows, choice] - utility[:, fallback] <= margin, fallback, choice)


# as router.policy: radii are shrunk by this much, so rounding in p ± m never turns a clear decision
_ROUNDING = 1e-12


def _shrunk(radius: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(radius), np.maximum(radius - _ROUNDING, 0.0), radius)


def threshold_radius(p: np.ndarray, cost: np.ndarray, names: Sequence[str], threshold: float,
                     fallback: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``router.policy.decision_radius`` for every row, threshold mode: (choice, radius). Estimates each less than
    the radius from a row's send it to the same backend."""
    n, k = p.shape
    choice = threshold_choices(p, cost, names, threshold, fallback)
    if k < 2:
        return choice, np.full(n, np.inf)
    rows = np.arange(n)
    pj, cj = p[rows, choice], cost[rows, choice]
    other = np.ones_like(p, dtype=bool)
    other[rows, choice] = False
    below = threshold - p  # how far each estimate is below the threshold
    half_gap = (pj[:, None] - p) / 2  # half the chosen estimate's lead over each
    none_clear = np.where(other, below, np.inf).min(axis=1)
    best_gap = np.where(other, half_gap, np.inf).min(axis=1)
    cheaper = other & (cost < cj[:, None])
    as_cheap = other & (cost == cj[:, None])
    ahead = np.where(cheaper, below, np.where(as_cheap, np.maximum(below, half_gap), np.inf)).min(axis=1)
    if fallback is None:
        alternative = np.minimum(none_clear, best_gap)
    else:
        alternative = np.where(choice == fallback, none_clear, 0.0)
    cleared = np.minimum(ahead, np.maximum(pj - threshold, alternative))
    unclear = none_clear if fallback is not None else np.minimum(none_clear, best_gap)
    return choice, _shrunk(np.where((p >= threshold).any(axis=1), cleared, unclear))


def utility_radius(p: np.ndarray, cost: np.ndarray, names: Sequence[str], cost_weight: float,
                   fallback: int | None = None, margin: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """``router.policy.decision_radius`` for every row, utility mode: (choice, radius)."""
    n, k = p.shape
    choice = utility_choices(p, cost, names, cost_weight, fallback, margin)
    if k < 2:
        return choice, np.full(n, np.inf)
    rows = np.arange(n)
    top = cost.max(axis=1, keepdims=True)
    utility = p - cost_weight * cost / np.where(top > 0, top, 1.0)
    other = np.ones_like(p, dtype=bool)
    other[rows, choice] = False
    lead = np.where(other, (utility[rows, choice][:, None] - utility) / 2, np.inf).min(axis=1)
    if fallback is None or margin <= 0:
        return choice, _shrunk(lead)
    rest = np.delete(utility, fallback, axis=1).max(axis=1) - utility[:, fallback]  # the best other's lead over it
    held = choice == fallback
    return choice, _shrunk(np.where(held, (margin - rest) / 2, np.minimum((rest - margin) / 2, lead)))


def threshold_frontier(p: np.ndarray, y: np.ndarray, cost: np.ndarray, names: Sequence[str], *,
                       fallback: int | None = None, points: int = 400) -> Points:
    grid = np.unique(np.concatenate([[0.0, 1.0 + 1e-9], np.quantile(p, np.linspace(0, 1, points))]))
    return _points(grid, [threshold_choices(p, cost, names, t, fallback) for t in grid], y, cost)


def utility_frontier(p: np.ndarray, y: np.ndarray, cost: np.ndarray, names: Sequence[str], *,
                     points: int = 400) -> Points:
    grid = np.concatenate([[0.0], np.geomspace(1e-4, 20.0, points - 1)])
    return _points(grid, [utility_choices(p, cost, names, lam) for lam in grid], y, cost)


def oracle_choices(y: np.ndarray, cost: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """The cheapest backend that answers right; the cheapest backend when none does."""
    return _rank(1.0 - y, cost, names)[:, 0]


def cost_at(points: Points, target: float) -> float:
    """The least mean cost of an operating point with accuracy ≥ target (NaN if none)."""
    ok = points.accuracy >= target - 1e-12
    return float(points.cost[ok].min()) if ok.any() else float("nan")


def mix_cost_at(accuracy: np.ndarray, cost: np.ndarray, target: float) -> float:
    """The least cost of a random mix of two backends (or one) reaching ``target`` accuracy (NaN if none)."""
    best = float("nan")
    for i in range(len(accuracy)):
        for j in range(len(accuracy)):
            lo, hi = accuracy[i], accuracy[j]
            if hi < target - 1e-12:
                continue
            f = 1.0 if hi == lo or lo >= target else (target - lo) / (hi - lo)
            f = min(max(f, 0.0), 1.0)
            c = (1 - f) * cost[i] + f * cost[j]
            if lo >= target - 1e-12:
                c = min(cost[i], c)
            best = c if np.isnan(best) else min(best, c)
    return best


def summarise(points: Points, best_accuracy: float, best_cost: float) -> dict[str, Any]:
    top = float(points.accuracy.max())
    out: dict[str, Any] = {
        "max_accuracy": round(top, 4),
        "cost_at_max_accuracy": cost_at(points, top),
    }
    for share in (0.95, 1.0):
        c = cost_at(points, share * best_accuracy)
        out[f"cost_at_{round(share * 100)}pct_of_best"] = c
        out[f"saved_at_{round(share * 100)}pct_of_best"] = round(1 - c / best_cost, 4) if np.isfinite(c) else None
    return out


def pool_report(
    names: Sequence[str], y: np.ndarray, cost: np.ndarray, routers: dict[str, np.ndarray], *,
    fallback: int | None = None, out_dir: Path | None = None, plot: str = "pool_frontier.png",
    threshold: float | None = None,
) -> dict[str, Any]:
    """Frontiers of both policies for each router's estimates ``routers[name]`` (n, k), with the baselines; with
    ``threshold`` (the config's ``policy.threshold``), also the one operating point the gateway would run at."""
    names = list(names)
    acc, mean_cost = y.mean(axis=0), cost.mean(axis=0)
    best = int(np.lexsort((mean_cost, -acc))[0])
    best_acc, best_cost = float(acc[best]), float(mean_cost[best])
    cheapest = int(np.lexsort((-acc, mean_cost))[0])
    result: dict[str, Any] = {
        "backends": {n: {"accuracy": round(float(a), 4), "cost_per_request": float(c)}
                     for n, a, c in zip(names, acc, mean_cost, strict=True)},
        "always_best": {"backend": names[best], "accuracy": round(best_acc, 4), "cost_per_request": best_cost},
        "always_cheapest": {"backend": names[cheapest], "accuracy": round(float(acc[cheapest]), 4),
                            "cost_per_request": float(mean_cost[cheapest])},
        "random_mix": {f"cost_at_{round(s * 100)}pct_of_best": mix_cost_at(acc, mean_cost, s * best_acc)
                       for s in (0.95, 1.0)},
        "policies": {},
    }
    oracle = _outcome(oracle_choices(y, cost, names), y, cost)
    result["oracle"] = {"accuracy": round(oracle[0], 4), "cost_per_request": oracle[1]}
    curves: dict[str, dict[str, Points]] = {}
    for router, p in routers.items():
        entry: dict[str, Any] = {}
        curves[router] = {
            "threshold": threshold_frontier(p, y, cost, names, fallback=fallback),
            "utility": utility_frontier(p, y, cost, names),
        }
        for policy, pts in curves[router].items():
            entry[policy] = summarise(pts, best_acc, best_cost)
        argmax = _outcome(utility_choices(p, cost, names, 0.0), y, cost)
        entry["argmax_p"] = {"accuracy": round(argmax[0], 4), "cost_per_request": argmax[1],
                             "reaches_best_single": bool(argmax[0] >= best_acc - 1e-12)}
        if threshold is not None:
            a, c, shares = _outcome(threshold_choices(p, cost, names, threshold, fallback), y, cost)
            entry["at_threshold"] = {"threshold": threshold, "accuracy": round(a, 4), "cost_per_request": c,
                                     "share": {n: round(float(v), 4) for n, v in zip(names, shares, strict=True)}}
        held = [_outcome(utility_choices(p, cost, names, 0.0, best, m), y, cost) for m in MARGINS]
        entry["argmax_p_margin"] = {
            "toward": names[best],
            "margins": [{"margin": m, "accuracy": round(a, 4), "cost_per_request": c}
                        for m, (a, c, _) in zip(MARGINS, held, strict=True)],
            "smallest_reaching_best_single": next(
                (m for m, (a, _, _) in zip(MARGINS, held, strict=True) if a >= best_acc - 1e-12), None),
        }
        entry["mean_p_minus_accuracy"] = {n: round(float(p[:, i].mean() - acc[i]), 4) for i, n in enumerate(names)}
        result["policies"][router] = entry
    if out_dir is not None:
        plot_pool(curves, names, acc, mean_cost, oracle, out_dir / plot)
        result["plot"] = plot
    return result


@contextmanager
def cost_accuracy_plot(path: Path, title: str, names: Sequence[str], acc: np.ndarray, cost: np.ndarray, *,
                       figsize: tuple[float, float], legend_size: int) -> Iterator[Axes]:
    """Axes of accuracy against mean cost per 1,000 requests to draw curves on; on leaving, each backend alone
    (``names``, their ``acc`` and ``cost`` per request) a labelled point, and the figure saved to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=figsize)
    try:
        yield ax
        ax.scatter(cost * 1000, acc, color="k", zorder=5)
        for n, a, c in zip(names, acc, cost, strict=True):
            ax.annotate(n, (c * 1000, a), textcoords="offset points", xytext=(4, -10), fontsize=7)
        ax.set(xlabel="mean cost per 1,000 requests (USD)", ylabel="accuracy", title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=legend_size, loc="lower right")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)


def plot_pool(curves: dict[str, dict[str, Points]], names: Sequence[str], acc: np.ndarray, cost: np.ndarray,
              oracle: tuple[float, float, np.ndarray], path: Path) -> None:
    styles = {"threshold": "-", "utility": "--"}
    with cost_accuracy_plot(path, "routing the pool (held-out estimates)", names, acc, cost, figsize=(8, 5.5),
                            legend_size=7) as ax:
        for i, (router, by_policy) in enumerate(curves.items()):
            for policy, pts in by_policy.items():
                order = np.argsort(pts.cost)
                ax.plot(pts.cost[order] * 1000, pts.accuracy[order], styles[policy], color=f"C{i}", lw=1.4,
                        label=f"{router}, {policy}")
        hull_c, hull_a = _upper_hull(cost, acc)
        ax.plot(hull_c * 1000, hull_a, color="0.5", lw=0.8, ls=":", label="random mixes")
        ax.scatter([oracle[1] * 1000], [oracle[0]], marker="*", color="0.5", label="oracle")
        ax.axhline(acc.max(), color="k", lw=0.5, ls=":")


def _upper_hull(cost: np.ndarray, acc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pts = sorted(zip(cost.tolist(), acc.tolist(), strict=True))
    hull: list[tuple[float, float]] = []
    for pt in pts:
        while len(hull) >= 2 and ((hull[-1][0] - hull[-2][0]) * (pt[1] - hull[-2][1])
                                  - (hull[-1][1] - hull[-2][1]) * (pt[0] - hull[-2][0])) >= 0:
            hull.pop()
        if not hull or pt[1] > hull[-1][1]:
            hull.append(pt)
    return np.array([h[0] for h in hull]), np.array([h[1] for h in hull])
