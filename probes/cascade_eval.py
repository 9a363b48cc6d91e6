"""``python -m probes eval --cascade``: how a cascade routes held-out data against the full probes.

Every backend's three models (text-only, early block, full probe) are fitted on the training rows of each outer
fold (one split for all backends, so a fold's margins are chosen on rows none of its held-out rows' models saw),
or on all of ``--data`` when a ``--test`` file is scored. In each fold, for each operating point of the policy
(the config's, and a sweep of thresholds or cost weights), the margins are chosen on the training rows' inner
out-of-fold estimates exactly as ``probes train`` chooses them, then the held-out rows are routed by the cascade:
the share each stage decides, how often it agrees with the full probes, and the accuracy and cost it reaches,
beside the full probes' own on the same rows. Nothing about a held-out row is used to route it but its features.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import StratifiedKFold
from tqdm import tqdm

from probes.cascade import (
    CONFIDENCE_Z,
    DEFAULT_AGREEMENT,
    choose_margins,
    decisions,
    early_scorer,
    fit_stage,
    policy_rule,
    route,
    stage_costs,
    text_inputs,
)
from probes.data import Dataset
from probes.extract import probe_inputs
from probes.fit import Inputs, fit_calibrated, probe_model
from probes.metrics import Frontier, apgr, auroc, routing_frontier
from probes.pool import Points, cost_accuracy_plot, summarise
from router import Rule, Settings

log = logging.getLogger(__name__)


def _rows(x: Any, idx: np.ndarray) -> Any:
    return x.take(idx) if isinstance(x, Inputs) else x[idx]


@dataclass(frozen=True)
class Fold:
    train: np.ndarray  # row indices of --data the models were fitted on
    held: np.ndarray  # row indices of the scored data (--data in nested CV, --test otherwise)
    inner: dict[str, np.ndarray]  # per model ("text", "early", "full"): (train rows, backends) inner out-of-fold
    estimates: dict[str, np.ndarray]  # per model: (held rows, backends)


@dataclass(frozen=True)
class Routed:
    """The held-out rows routed at one operating point."""

    knob: float
    full: np.ndarray  # the full probes' decision per row
    cascade: np.ndarray  # the cascade's
    by: np.ndarray  # which stage decided it (index into the stages; len(stages): the full probes)
    margins: list[dict[str, float]]  # per fold


def fit_folds(
    settings: Settings, dataset: Dataset, usable: Sequence[tuple[Any, np.ndarray]], *, test: Dataset | None,
    text: str, early_layer: int | None, folds: int, seed: int, label_keys: dict[str, str],
    train_keys: dict[str, list[str]], progress: bool,
) -> list[Fold]:
    """Every backend's models of every stage, fitted per outer fold (or once, on all of ``dataset``)."""
    model, grid = probe_model(text)
    x = {"full": probe_inputs(settings.scorer, dataset, text, progress=progress)[0], "text": text_inputs(dataset)}
    x_test: dict[str, Any] = {}
    if test is not None:
        x_test = {"full": probe_inputs(settings.scorer, test, text, progress=progress)[0], "text": text_inputs(test)}
    if early_layer is not None:
        cfg = early_scorer(settings.scorer, early_layer)
        x["early"], scorer = probe_inputs(cfg, dataset, text, progress=progress)
        if test is not None:
            x_test["early"] = probe_inputs(cfg, test, text, scorer=scorer, progress=progress)[0]
    n = len(dataset.records)
    if test is None:
        together = np.sum([y for _, y in usable], axis=0)  # one split for every backend: by how many answer right
        splits = list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(np.zeros(n), together))
    else:
        splits = [(np.arange(n), np.arange(len(test.records)))]
    stages = [s for s in ("text", "early", "full") if s in x]
    bar = tqdm(total=len(splits) * len(usable) * len(stages), desc="cascade models", unit="model",
               disable=not progress)
    out = []
    for tr, te in splits:
        inner = {s: np.zeros((len(tr), len(usable))) for s in stages}
        held = {s: np.zeros((len(te), len(usable))) for s in stages}
        for j, (b, y) in enumerate(usable):
            key = label_keys.get(b.name, b.model)
            ys = [dataset.training_labels(k)[tr] for k in train_keys.get(b.name, [key])]
            for s in stages:
                x_held = _rows(x_test[s] if test is not None else x[s], te)
                if s == "full":
                    fitted = fit_calibrated(_rows(x[s], tr), ys, y[tr], cs=grid, folds=folds, seed=seed, model=model)
                else:
                    fitted = fit_stage(s, _rows(x[s], tr), ys, y[tr], text=text, model=model, cs=grid, folds=folds,
                                       seed=seed)
                inner[s][:, j] = fitted.inner_probability
                held[s][:, j] = fitted.probability(x_held)
                bar.update()
        out.append(Fold(tr, te, inner, held))
    bar.close()
    return out


def route_held_out(folds: Sequence[Fold], names: Sequence[str], cost_train: np.ndarray, cost_held: np.ndarray,
                   rule: Rule, *, agreement: float, compute: dict[str, float], n_held: int) -> Routed:
    """Route every held-out row at ``rule``: margins chosen in its fold's training rows, then the cascade."""
    stages = [s for s in ("text", "early") if s in folds[0].inner]
    full_all, cascade_all, by_all = (np.zeros(n_held, dtype=np.int64) for _ in range(3))
    margins = []
    for f in folds:
        full_t = decisions(f.inner["full"], cost_train[f.train], names, rule)[0]
        chosen = choose_margins(full_t, {s: decisions(f.inner[s], cost_train[f.train], names, rule) for s in stages},
                                agreement=agreement, cost=compute)
        full_h = decisions(f.estimates["full"], cost_held[f.held], names, rule)[0]
        choice, by = route(full_h, {s: decisions(f.estimates[s], cost_held[f.held], names, rule) for s in stages},
                           chosen.margins)
        full_all[f.held], cascade_all[f.held], by_all[f.held] = full_h, choice, by
        margins.append(chosen.margins)
    knob = rule.cost_weight if rule.mode == "utility" else rule.threshold
    return Routed(knob, full_all, cascade_all, by_all, margins)


def _at(choice: np.ndarray, y: np.ndarray, cost: np.ndarray) -> tuple[float, float]:
    rows = np.arange(len(choice))
    return float(y[rows, choice].mean()), float(cost[rows, choice].mean())


def _points(routed: Sequence[Routed], which: str, y: np.ndarray, cost: np.ndarray) -> Points:
    out = [_at(getattr(r, which), y, cost) for r in routed]
    shares = np.stack([np.bincount(getattr(r, which), minlength=y.shape[1]) / len(y) for r in routed])
    return Points(np.array([r.knob for r in routed]), np.array([a for a, _ in out]), np.array([c for _, c in out]),
                  shares)


def _policy_apgr(points: Points, y: np.ndarray, cheap: int, dear: int) -> float:
    """APGR of a two-backend policy's operating points (the dear backend's share against accuracy)."""
    share, acc = points.shares[:, dear], points.accuracy
    ends_cheap, ends_dear = float(y[:, cheap].mean()), float(y[:, dear].mean())
    # where the policy never sends every request one way (no fallback: the best estimate), the line to that end
    # (a random mix) completes the curve
    share = np.concatenate([[0.0], share, [1.0]])
    acc = np.concatenate([[ends_cheap], acc, [ends_dear]])
    order = np.argsort(share, kind="stable")
    f = Frontier(thresholds=np.arange(len(share), dtype=np.float64), dear_share=share[order], accuracy=acc[order],
                 cost=np.zeros(len(share)), cheap_accuracy=ends_cheap, dear_accuracy=ends_dear)
    return apgr(f)


def accuracy_at_equal_cost(cascade: Points, full: Points) -> dict[str, float]:
    """The cascade's accuracy minus the full probes' at the cascade's cost, at each of its operating points
    inside the full probes' range of costs: the full probes' accuracy there is the best of their operating
    points costing no more, joined by straight lines (their upper envelope)."""
    order = np.argsort(full.cost)
    c, a = full.cost[order], np.maximum.accumulate(full.accuracy[order])
    inside = (cascade.cost >= c[0]) & (cascade.cost <= c[-1])
    gaps = cascade.accuracy[inside] - np.interp(cascade.cost[inside], c, a)
    if not len(gaps):
        return {"mean": None, "worst": None, "points": 0}
    return {"mean": round(float(gaps.mean()), 4), "worst": round(float(gaps.min()), 4), "points": len(gaps)}


def evaluate_cascade(
    settings: Settings, dataset: Dataset, usable: Sequence[tuple[Any, np.ndarray]], y: np.ndarray,
    cost_train: np.ndarray, cost_held: np.ndarray, *, test: Dataset | None = None, text: str = "none",
    early_layer: int | None = None, agreement: float = DEFAULT_AGREEMENT, folds: int = 5, seed: int = 0,
    label_keys: dict[str, str] | None = None, train_keys: dict[str, list[str]] | None = None, points: int = 101,
    out_dir: Path | None = None, progress: bool = True,
) -> dict[str, Any]:
    """The cascade section of the eval report. ``usable``: (backend, labels of ``dataset``); ``y``, ``cost_held``:
    labels and costs of the scored rows ((rows, backends)); ``cost_train``: costs of ``dataset``'s rows."""
    names = [b.name for b, _ in usable]
    fitted = fit_folds(settings, dataset, usable, test=test, text=text, early_layer=early_layer, folds=folds,
                       seed=seed, label_keys=label_keys or {}, train_keys=train_keys or {}, progress=progress)
    stages = [s for s in ("text", "early") if s in fitted[0].inner]
    compute = stage_costs(settings.scorer, early_layer if "early" in stages else None)
    rule = policy_rule(settings.policy)
    n = len(y)

    def at(r: Rule) -> Routed:
        return route_held_out(fitted, names, cost_train, cost_held, r, agreement=agreement, compute=compute,
                              n_held=n)

    here = at(rule)
    held = {s: np.zeros((n, len(names))) for s in [*stages, "full"]}
    for f in fitted:
        for s in held:
            held[s][f.held] = f.estimates[s]
    decided = {s: round(float(np.mean(here.by == i)), 4) for i, s in enumerate([*stages, "full"])}
    report: dict[str, Any] = {
        "protocol": ("one outer split for every backend (stratified by how many backends answer right), "
                     f"{folds} folds" if test is None else "trained on data, scored on test"),
        "margins_chosen_on": "each fold's training rows: inner out-of-fold estimates of every model, as "
                             "`probes train` chooses them (disagreements e of n rows with e + "
                             f"{CONFIDENCE_Z}·√e ≤ (1 − agreement)·n); never the rows routed",
        "agreement_target": agreement, "early_layer": early_layer if "early" in stages else None,
        "compute_per_stage": compute, "policy": rule.as_dict(),
        "held_out_auroc": {b: {s: round(auroc(y[:, j], held[s][:, j]), 4) for s in held}
                           for j, b in enumerate(names)},
        "at_policy": {
            "margins_per_fold": [{s: round(m, 6) for s, m in mm.items()} for mm in here.margins],
            "decided": decided,
            "agreement": round(float(np.mean(here.cascade == here.full)), 4),
            "compute": round(sum(decided[s] * compute[s] for s in decided), 4),
        },
    }
    for which, choice in (("cascade", here.cascade), ("full", here.full)):
        acc, c = _at(choice, y, cost_held)
        report["at_policy"][which] = {"accuracy": round(acc, 4), "cost_per_request": c}
    for s in stages:  # each stage alone deciding everything, for reference
        acc, c = _at(decisions(held[s], cost_held, names, rule)[0], y, cost_held)
        report["at_policy"][f"{s}_alone"] = {"accuracy": round(acc, 4), "cost_per_request": c}
    # the policy's frontier: a sweep of its knob, margins re-chosen (in the training rows) at each point
    if rule.mode == "utility":
        knobs = np.concatenate([[0.0], np.geomspace(1e-4, 20.0, points - 1)])
        rules = [replace(rule, cost_weight=float(k)) for k in knobs]
    else:
        knobs = np.unique(np.concatenate([[0.0, 1.0 + 1e-9], np.quantile(held["full"], np.linspace(0, 1, points))]))
        rules = [replace(rule, threshold=float(k)) for k in knobs]
    sweep = [at(r) for r in tqdm(rules, desc="cascade frontier", unit="point", disable=not progress)]
    cascade_pts, full_pts = _points(sweep, "cascade", y, cost_held), _points(sweep, "full", y, cost_held)
    acc, mean_cost = y.mean(axis=0), cost_held.mean(axis=0)
    best = int(np.lexsort((mean_cost, -acc))[0])
    agree = np.array([np.mean(r.cascade == r.full) for r in sweep])
    by_stage = {s: round(float(np.mean([np.mean(r.by == i) for r in sweep])), 4)
                for i, s in enumerate([*stages, "full"])}
    frontier: dict[str, Any] = {
        "knob": "cost_weight" if rule.mode == "utility" else "threshold", "points": len(sweep),
        "agreement": {"mean": round(float(agree.mean()), 4), "least": round(float(agree.min()), 4)},
        "mean_decided": by_stage,
        "cascade": summarise(cascade_pts, float(acc[best]), float(mean_cost[best])),
        "full": summarise(full_pts, float(acc[best]), float(mean_cost[best])),
        "accuracy_at_equal_cost": accuracy_at_equal_cost(cascade_pts, full_pts),
    }
    if len(names) == 2:
        cheap, dear = int(np.argmin(mean_cost)), int(np.argmax(mean_cost))
        exact = routing_frontier(held["full"][:, cheap], y[:, cheap], y[:, dear], cost_held[:, cheap],
                                 cost_held[:, dear])
        frontier["apgr"] = {"cascade": round(_policy_apgr(cascade_pts, y, cheap, dear), 4),
                            "full": round(_policy_apgr(full_pts, y, cheap, dear), 4),
                            "full_every_threshold": round(apgr(exact), 4),
                            "note": f"the policy's operating points, {names[dear]}'s share against accuracy; "
                                    "'full_every_threshold': the full probe's routing frontier at every distinct "
                                    "estimate (threshold mode with the dear backend as fallback)"}
    report["frontier"] = frontier
    if out_dir is not None:
        report["plot"] = plot_cascade(cascade_pts, full_pts, names, acc, mean_cost, out_dir / "cascade_frontier.png",
                                      frontier["knob"])
    return report


def plot_cascade(cascade: Points, full: Points, names: Sequence[str], acc: np.ndarray, cost: np.ndarray, path: Path,
                 knob: str) -> str:
    with cost_accuracy_plot(path, "cascade against the full probes (held out)", names, acc, cost, figsize=(7.5, 5),
                            legend_size=8) as ax:
        for pts, label, style in ((full, "full probes", "-"), (cascade, "cascade", "--")):
            order = np.argsort(pts.cost)
            ax.plot(pts.cost[order] * 1000, pts.accuracy[order], style, lw=1.4, label=f"{label} ({knob} swept)")
    return path.name


def render_cascade(c: dict[str, Any]) -> list[str]:
    at, fr = c["at_policy"], c["frontier"]
    stages = [s for s in at["decided"] if s != "full"]
    lines = [
        "## Cascade (cheaper stages first)",
        "",
        f"Stages: {', '.join(stages)}, then the full probes"
        + (f" (early: block {c['early_layer']})" if c.get("early_layer") else "")
        + f". Margins chosen for agreement ≥ {c['agreement_target']} with the full probes' decisions on "
        f"{c['margins_chosen_on']}. Protocol: {c['protocol']}.",
        "",
        "Held-out AUROC per model: " + "; ".join(
            f"{b} " + ", ".join(f"{s} {v:.3f}" for s, v in per.items()) for b, per in c["held_out_auroc"].items()),
        "",
        f"At the config's policy ({c['policy']}):",
        "",
        "| " + " | ".join(f"decided by {s}" for s in at["decided"]) + " | agreement | blocks run (share of the "
        "full pass) | accuracy cascade / full | cost /1k cascade / full |",
        "| --- " * (len(at["decided"]) + 4) + "|",
        "| " + " | ".join(f"{v:.1%}" for v in at["decided"].values()) + f" | {at['agreement']:.4f} | "
        f"{at['compute']:.3f} | {at['cascade']['accuracy']:.4f} / {at['full']['accuracy']:.4f} | "
        f"{at['cascade']['cost_per_request'] * 1000:.4f} / {at['full']['cost_per_request'] * 1000:.4f} |",
        "",
        "Margins per fold: " + "; ".join(", ".join(f"{s} {m:.4f}" for s, m in mm.items())
                                         for mm in at["margins_per_fold"])
        + ". Each stage alone deciding every request: " + "; ".join(
            f"{s} accuracy {at[f'{s}_alone']['accuracy']:.4f}" for s in stages) + ".",
        "",
        f"Over the policy's frontier ({fr['points']} values of {fr['knob']}, margins re-chosen at each): agreement "
        f"{fr['agreement']['mean']:.4f} on average (least {fr['agreement']['least']:.4f}); decided by "
        + ", ".join(f"{s} {v:.1%}" for s, v in fr["mean_decided"].items()) + " on average.",
        "",
        "| router | highest accuracy | cost /1k at 95% of best | at 100% of best | APGR |",
        "| --- | --- | --- | --- | --- |",
    ]
    apgr_of = fr.get("apgr", {})
    for which in ("full", "cascade"):
        e = fr[which]
        lines.append(f"| {which} | {e['max_accuracy']:.4f} | {_usd(e['cost_at_95pct_of_best'])} | "
                     f"{_usd(e['cost_at_100pct_of_best'])} | "
                     + (f"{apgr_of[which]:.4f}" if which in apgr_of else "–") + " |")
    eq = fr["accuracy_at_equal_cost"]
    equal = (f"Cascade accuracy minus the full probes' at equal cost: {eq['mean']:+.4f} on average, "
             f"{eq['worst']:+.4f} at worst ({eq['points']} operating points)." if eq["points"] else
             "No operating point of the cascade costs what one of the full probes' does.")
    lines += ["", equal + (f" The full probe's APGR at every distinct estimate: {apgr_of['full_every_threshold']:.4f}."
                           if apgr_of else ""), ""]
    if c.get("plot"):
        lines += [f"![cascade frontier]({c['plot']})", ""]
    return lines


def _usd(v: float | None) -> str:
    return "–" if v is None or not np.isfinite(v) else f"{v * 1000:.4f}"
