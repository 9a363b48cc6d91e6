"""``python -m probes eval``: honest (nested cross-validated) quality of the probes and of routing on them.

Per backend: AUROC, Brier and ECE of the probe's out-of-fold success estimates with bootstrap intervals,
beside two baselines validated the same way (prompt length; TF-IDF + logistic regression) and the data's
reference probabilities (``paper_probe_p``) where present. Then the routing frontier between the cheapest and
the dearest backend under the gateway's two-backend policy (send to the dear backend when the cheap one's
estimate is below a threshold), with APGR, the share of dear calls needed to recover 50% and 80% of the
quality gap, and the cost saved at the best single backend's accuracy.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from probes.cascade import CascadeTraining
from probes.cascade_eval import evaluate_cascade
from probes.data import Dataset, estimate_costs
from probes.extract import probe_inputs
from probes.fit import DEFAULT_CS, TfidfLogistic, held_out, probe_model
from probes.metrics import (
    Frontier,
    apgr,
    auroc,
    bootstrap_ci,
    brier,
    cost_saved_at_best,
    ece,
    routing_frontier,
    share_to_recover,
)
from probes.pool import pool_report, threshold_choices, threshold_frontier
from router import BackendConfig, Settings

log = logging.getLogger(__name__)

TFIDF_CS: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)


def _quality(y: np.ndarray, p: np.ndarray, rounds: int, seed: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, fn in (("auroc", auroc), ("brier", brier), ("ece", ece)):
        value = fn(y, p)
        lo, hi = bootstrap_ci(lambda idx, fn=fn: fn(y[idx], p[idx]), len(y), rounds=rounds, seed=seed)
        out[name] = round(value, 4)
        out[f"{name}_ci95"] = [round(lo, 4), round(hi, 4)]
    return out


def _frontier_summary(
    f: Frontier, cheap_cost: float, dear_cost: float, bootstrap: Callable[[], tuple[float, float]] | None,
) -> dict[str, Any]:
    saved = cost_saved_at_best(f, cheap_cost, dear_cost)
    out: dict[str, Any] = {
        "apgr": round(apgr(f), 4),
        "dear_share_for_50pct_gap": round(share_to_recover(f, 0.5), 4),
        "dear_share_for_80pct_gap": round(share_to_recover(f, 0.8), 4),
        "cost_saved_at_best_single_accuracy": {k: round(v, 8) for k, v in saved.items()},
    }
    if bootstrap is not None:
        lo, hi = bootstrap()
        out["apgr_ci95"] = [round(lo, 4), round(hi, 4)]
    return out


def _apgr_ci(
    p: np.ndarray, yc: np.ndarray, yd: np.ndarray, cc: np.ndarray, cd: np.ndarray, rounds: int, seed: int,
) -> Callable[[], tuple[float, float]]:
    def stat(idx: np.ndarray) -> float:
        f = routing_frontier(p[idx], yc[idx], yd[idx], cc[idx], cd[idx])
        if f.dear_accuracy == f.cheap_accuracy:
            raise ValueError("no gap")
        return apgr(f)

    return lambda: bootstrap_ci(stat, len(p), rounds=rounds, seed=seed)


def labelled_backends(
    settings: Settings, dataset: Dataset, label_keys: dict[str, str]
) -> list[tuple[BackendConfig, np.ndarray]]:
    """(backend, its 0/1 labels) for every backend of the config that has labels in ``dataset``."""
    usable = []
    for b in settings.backends:
        try:
            usable.append((b, dataset.labels(label_keys.get(b.name, b.model))))
        except KeyError as e:
            log.warning("skipping backend %s: %s", b.name, e)
    return usable


def shared_keys(
    settings: Settings, dataset: Dataset, label_keys: dict[str, str]
) -> dict[str, list[str]]:
    """Every labelled backend trained on all labelled backends' labels, stacked (a shared difficulty
    direction; C, Platt and the metrics stay per backend)."""
    keys = [label_keys.get(b.name, b.model) for b, _ in labelled_backends(settings, dataset, label_keys)]
    return {b.name: keys for b in settings.backends}


def evaluate(
    settings: Settings, dataset: Dataset, out_dir: Path, *, test: Dataset | None = None, text: str = "none",
    folds: int = 5, seed: int = 0, rounds: int = 1000, cs: Sequence[Any] | None = None,
    label_keys: dict[str, str] | None = None, train_keys: dict[str, list[str]] | None = None, command: str = "",
    progress: bool = True, cascade: CascadeTraining | None = None,
) -> dict[str, Any]:
    """Write ``out_dir/report.json``, ``report.md`` and the plots; return the report.

    Without ``test``: nested cross-validation on ``dataset``. With it: every estimator trained on ``dataset``
    and scored on ``test``, whose labels, costs and reference probabilities the report uses. With ``cascade``,
    the report also routes the held-out rows by a cascade of cheaper stages (``probes.cascade_eval``)."""
    label_keys, train_keys = label_keys or {}, train_keys or {}
    model, grid = probe_model(text, cs)
    x, extractor = probe_inputs(settings.scorer, dataset, text, progress=progress)
    x_test = None if test is None else probe_inputs(settings.scorer, test, text, scorer=extractor,
                                                    progress=progress)[0]
    scored = test or dataset

    def lengths_of(d: Dataset) -> np.ndarray:
        return np.array([len(extractor.encoder.encode(c)) for c in d.conversations()], dtype=np.float64)

    lengths = lengths_of(dataset)
    lengths_scored = lengths if test is None else lengths_of(test)
    texts = np.array(dataset.questions, dtype=object)
    texts_test = None if test is None else np.array(test.questions, dtype=object)
    usable = labelled_backends(settings, dataset, label_keys)
    if test is not None:
        in_test = {b.name for b, _ in labelled_backends(settings, test, label_keys)}
        usable = [(b, y) for b, y in usable if b.name in in_test]
    if not usable:
        raise ValueError("no backend of the config has labels in the data")
    def own_labels_only(backend: Any) -> bool:
        key = label_keys.get(backend.name, backend.model)
        return train_keys.get(backend.name, [key]) == [key]

    fits = sum(3 if own_labels_only(b) else 4 for b, _ in usable)
    bar = tqdm(total=fits, desc="nested CV" if test is None else "train → test", unit="model", disable=not progress)
    report: dict[str, Any] = {
        "command": command,
        "data": {"path": str(dataset.path), "sha256_16": dataset.digest(), "n": len(dataset.records)},
        "protocol": "nested cross-validation" if test is None else "trained on data, scored on test",
        "scorer": extractor.info.recipe() | {"model": extractor.info.model, "fingerprint": extractor.info.fingerprint,
                                             "max_prompt_tokens": settings.scorer.max_prompt_tokens},
        "text_features": text,
        "folds": folds, "seed": seed, "bootstrap_rounds": rounds, "C_grid": [list(c) if isinstance(c, tuple) else c
                                                                             for c in grid],
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "backends": {},
    }
    if test is not None:
        report["test"] = {"path": str(test.path), "sha256_16": test.digest(), "n": len(test.records)}
    estimates: dict[str, dict[str, np.ndarray]] = {}
    scored_usable = []
    for b, y_train in usable:
        key = label_keys.get(b.name, b.model)
        y = scored.labels(key)
        ys = [dataset.training_labels(k) for k in train_keys.get(b.name, [key])]
        common = {"folds": folds, "seed": seed}
        probe = held_out(x, ys, y_train, x_test=x_test, cs=grid, model=model, **common)
        bar.update()
        length = held_out(-lengths.reshape(-1, 1), [y_train], y_train,
                          x_test=None if test is None else -lengths_scored.reshape(-1, 1), cs=DEFAULT_CS, **common)
        bar.update()
        tfidf = held_out(texts, [y_train], y_train, x_test=texts_test, cs=TFIDF_CS, model=TfidfLogistic(), **common)
        bar.update()
        # The probe trained on other label sets too (--share-labels, --train-labels): TF-IDF on the same sets is
        # the fair text baseline, so what the activations add shows apart from what the labels add.
        same_labels = None
        if not own_labels_only(b):
            same_labels = held_out(texts, ys, y_train, x_test=texts_test, cs=TFIDF_CS, model=TfidfLogistic(),
                                   **common)
            bar.update()
        entry: dict[str, Any] = {
            "label": key, "trained_on": train_keys.get(b.name, [key]), "n": len(y),
            "base_rate": round(float(y.mean()), 4),
            **_quality(y, probe.probability, rounds, seed),
            "C_per_fold": [list(c) if isinstance(c, tuple) else c for c in probe.chosen or []],
            "baselines": {
                "prompt_length": _quality(y, length.probability, rounds, seed),
                "tfidf_logreg": _quality(y, tfidf.probability, rounds, seed) | {"C_per_fold": tfidf.chosen},
            },
        }
        if same_labels is not None:
            entry["baselines"]["tfidf_logreg_same_labels"] = (_quality(y, same_labels.probability, rounds, seed)
                                                              | {"C_per_fold": same_labels.chosen})
        if test is not None:
            entry["train_base_rate"] = round(float(y_train.mean()), 4)
        est = {"probe": probe.probability, "prompt_length": length.probability, "tfidf_logreg": tfidf.probability}
        reference = scored.reference(key)
        if reference is not None:
            entry["reference_paper_probe"] = _quality(y, reference, rounds, seed)
            est["paper_probe"] = reference
        report["backends"][b.name] = entry
        estimates[b.name] = est
        scored_usable.append((b, y))
    bar.close()
    if len(scored_usable) >= 2:
        report["routing"] = _routing(settings, scored, scored_usable, estimates, lengths_scored, out_dir, rounds,
                                     seed)
        report["pool"] = _pool(settings, scored, scored_usable, estimates, lengths_scored, out_dir)
        if cascade is not None:
            def cost_of(d: Dataset, tokens: np.ndarray) -> np.ndarray:
                return np.stack([estimate_costs(d, b, tokens, settings.policy.expected_output_tokens)[0]
                                 for b, _ in usable], axis=1)

            report["cascade"] = evaluate_cascade(
                settings, dataset, usable, np.stack([y for _, y in scored_usable], axis=1).astype(np.float64),
                cost_of(dataset, lengths), cost_of(scored, lengths_scored), test=test, text=text,
                early_layer=cascade.early_layer, agreement=cascade.agreement, folds=folds, seed=seed,
                label_keys=label_keys, train_keys=train_keys, out_dir=out_dir, progress=progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "report.md").write_text(render_markdown(report))
    return report


def _pool(
    settings: Settings, dataset: Dataset, usable: list[tuple[BackendConfig, np.ndarray]],
    estimates: dict[str, dict[str, np.ndarray]], lengths: np.ndarray, out_dir: Path,
) -> dict[str, Any]:
    names = [b.name for b, _ in usable]
    y = np.stack([y for _, y in usable], axis=1).astype(np.float64)
    cost = np.stack([estimate_costs(dataset, b, lengths, settings.policy.expected_output_tokens)[0]
                     for b, _ in usable], axis=1)
    routers = {r: np.stack([estimates[n][r] for n in names], axis=1)
               for r in ("probe", "tfidf_logreg", "paper_probe") if all(r in estimates[n] for n in names)}
    fallback = names.index(settings.policy.fallback) if settings.policy.fallback in names else None
    out = pool_report(names, y, cost, routers, fallback=fallback, out_dir=out_dir)
    out["threshold_policy"] = ("the cheapest backend whose estimate is at least the threshold; when none is, "
                               + (f"the fallback {settings.policy.fallback}" if fallback is not None
                                  else "the highest estimate"))
    out["utility_policy"] = "argmax p − λ·cost/max cost, λ swept"
    return out


def _routing(
    settings: Settings, dataset: Dataset, usable: list[tuple[BackendConfig, np.ndarray]],
    estimates: dict[str, dict[str, np.ndarray]], lengths: np.ndarray, out_dir: Path, rounds: int, seed: int,
) -> dict[str, Any]:
    out_tokens = settings.policy.expected_output_tokens
    costs = {b.name: estimate_costs(dataset, b, lengths, out_tokens) for b, _ in usable}
    cheap, y_cheap = min(usable, key=lambda t: costs[t[0].name][0].mean())
    dear, y_dear = max(usable, key=lambda t: costs[t[0].name][0].mean())
    cc, cd = costs[cheap.name][0], costs[dear.name][0]
    routers = dict(estimates[cheap.name])
    routers["oracle"] = (y_cheap - y_dear).astype(np.float64)  # sends exactly the cheap model's fixable misses
    frontiers = {name: routing_frontier(p, y_cheap, y_dear, cc, cd) for name, p in routers.items()}
    result: dict[str, Any] = {
        "policy": f"send to {dear.name} when the {cheap.name} probe's estimate is below the threshold",
        "cheap": cheap.name, "dear": dear.name,
        "cheap_accuracy": round(float(y_cheap.mean()), 4), "dear_accuracy": round(float(y_dear.mean()), 4),
        "cheap_cost_per_request": round(float(cc.mean()), 8), "dear_cost_per_request": round(float(cd.mean()), 8),
        "cost_source": costs[dear.name][1],
        "random_apgr": 0.5,
    }
    for name, f in frontiers.items():
        ci = _apgr_ci(routers[name], y_cheap, y_dear, cc, cd, rounds, seed) if name != "oracle" else None
        summary = _frontier_summary(f, float(cc.mean()), float(cd.mean()), ci)
        if name == "probe":
            result.update(summary)
        else:
            result.setdefault("baselines", {})[name] = summary
    plot_frontier(frontiers, out_dir / "frontier.png", cheap.name, dear.name)
    result["plot"] = "frontier.png"
    return result


def plot_frontier(frontiers: dict[str, Frontier], path: Path, cheap: str, dear: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    styles = {"probe": "-", "paper_probe": "--", "tfidf_logreg": ":", "prompt_length": "-.", "oracle": "-"}
    for name, f in frontiers.items():
        label = f"{name} (APGR {apgr(f):.3f})"
        kw = {"color": "0.7", "lw": 1} if name == "oracle" else {"lw": 1.6}
        left.plot(f.dear_share, f.accuracy, styles.get(name, "-"), label=label, **kw)
        right.plot(f.cost * 1000, f.accuracy, styles.get(name, "-"), label=name, **kw)
    any_f = next(iter(frontiers.values()))
    left.plot([0, 1], [any_f.cheap_accuracy, any_f.dear_accuracy], color="k", lw=0.8, alpha=0.5,
              label="random (APGR 0.500)")
    left.set(xlabel=f"share of requests sent to {dear}", ylabel="accuracy",
             title="accuracy vs share of dear calls (out-of-fold)")
    right.set(xlabel="mean cost per 1,000 requests (USD)", ylabel="accuracy", title="accuracy vs cost")
    for ax in (left, right):
        ax.axhline(any_f.dear_accuracy, color="k", lw=0.5, ls=":")
        ax.axhline(any_f.cheap_accuracy, color="k", lw=0.5, ls=":")
        ax.grid(alpha=0.3)
    left.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"routing {cheap} → {dear}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _ci(entry: dict[str, Any], name: str) -> str:
    lo, hi = entry.get(f"{name}_ci95", [float("nan"), float("nan")])
    return f"{entry[name]:.3f} [{lo:.3f}, {hi:.3f}]"


def _protocol(report: dict[str, Any]) -> str:
    if "test" in report:
        return (f"Trained on these, scored on `{report['test']['path']}` ({report['test']['n']} questions); C and "
                f"Platt by {report['folds']}-fold CV on the training data, seed {report['seed']}.")
    return f"{report['folds']}-fold nested cross-validation, seed {report['seed']}."


def render_markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Probe evaluation",
        "",
        f"`{report['command']}`" if report.get("command") else "",
        "",
        f"Data: `{report['data']['path']}` ({report['data']['n']} questions). Scorer: {report['scorer']['model']}, "
        f"layers {report['scorer']['layers']}, pooling {report['scorer']['pooling']}"
        + (f", at most {report['scorer']['max_prompt_tokens']} prompt tokens"
           if "max_prompt_tokens" in report["scorer"] else "")
        + "; text features beside the "
        f"activations: {report.get('text_features', 'none')}. " + _protocol(report)
        + f" 95% intervals from {report['bootstrap_rounds']} bootstrap resamples of the questions.",
        "",
        "## Success estimates (held out)",
        "",
        "| backend | estimator | AUROC [95% CI] | Brier [95% CI] | ECE [95% CI] |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, entry in report["backends"].items():
        rows = [("probe", entry), *entry["baselines"].items()]
        if "reference_paper_probe" in entry:
            rows.append(("paper probe (reference)", entry["reference_paper_probe"]))
        for est, e in rows:
            lines.append(f"| {name} | {est} | {_ci(e, 'auroc')} | {_ci(e, 'brier')} | {_ci(e, 'ece')} |")
    routing = report.get("routing")
    if routing:
        lines += [
            "",
            "## Routing frontier",
            "",
            f"{routing['policy']}. Accuracy {routing['cheap']} {routing['cheap_accuracy']:.3f}, "
            f"{routing['dear']} {routing['dear_accuracy']:.3f}; cost per request "
            f"{routing['cheap_cost_per_request']:.6f} / {routing['dear_cost_per_request']:.6f} USD "
            f"({routing['cost_source']}). Random routing has APGR 0.5.",
            "",
            "| router | APGR [95% CI] | dear share for 50% of gap | for 80% | cost saved at best single accuracy |",
            "| --- | --- | --- | --- | --- |",
        ]
        rows = [("probe", routing), *routing.get("baselines", {}).items()]
        for est, e in rows:
            apgr_text = _ci(e, "apgr") if "apgr_ci95" in e else f"{e['apgr']:.3f}"
            saved = e["cost_saved_at_best_single_accuracy"]["saved_fraction"]
            lines.append(f"| {est} | {apgr_text} | {e['dear_share_for_50pct_gap']:.3f} | "
                         f"{e['dear_share_for_80pct_gap']:.3f} | {saved:.1%} |")
        lines += ["", f"![frontier]({routing['plot']})", ""]
    if report.get("pool"):
        lines += render_pool(report["pool"])
    if report.get("cascade"):
        from probes.cascade_eval import render_cascade

        lines += render_cascade(report["cascade"])
    return "\n".join(lines) + "\n"


def _usd(v: float | None) -> str:
    return "–" if v is None or not np.isfinite(v) else f"{v * 1000:.4f}"


def render_pool(pool: dict[str, Any]) -> list[str]:
    best = pool["always_best"]
    lines = [
        "## Routing the whole pool",
        "",
        "Backends (accuracy, cost per 1,000 requests in USD): " + ", ".join(
            f"{n} {b['accuracy']:.3f} / {_usd(b['cost_per_request'])}" for n, b in pool["backends"].items())
        + f". Best single: {best['backend']}. Threshold policy: {pool['threshold_policy']}. "
        f"Utility policy: {pool['utility_policy']}.",
        "",
        "| router | policy | highest accuracy | its cost /1k | cost /1k at 95% of best | saved | at 100% of best "
        "| saved |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| always {best['backend']} | – | {best['accuracy']:.3f} | {_usd(best['cost_per_request'])} | – | – | "
        f"{_usd(best['cost_per_request'])} | 0 |",
        f"| random mixes of two | – | {best['accuracy']:.3f} | – | "
        f"{_usd(pool['random_mix']['cost_at_95pct_of_best'])} | – | "
        f"{_usd(pool['random_mix']['cost_at_100pct_of_best'])} | – |",
    ]
    for router, entry in pool["policies"].items():
        for policy in ("threshold", "utility"):
            e = entry[policy]
            lines.append(
                f"| {router} | {policy} | {e['max_accuracy']:.3f} | {_usd(e['cost_at_max_accuracy'])} | "
                f"{_usd(e['cost_at_95pct_of_best'])} | {_pct(e['saved_at_95pct_of_best'])} | "
                f"{_usd(e['cost_at_100pct_of_best'])} | {_pct(e['saved_at_100pct_of_best'])} |")
    oracle = pool["oracle"]
    lines.append(f"| oracle (upper bound) | – | {oracle['accuracy']:.3f} | {_usd(oracle['cost_per_request'])} | "
                 "– | – | – | – |")
    lines += ["", "Calibration across backends: argmax p (λ = 0) against the best single backend's accuracy "
              f"{best['accuracy']:.3f}; mean p − accuracy per backend.", "",
              "| router | argmax-p accuracy | reaches the best single | mean p − accuracy |",
              "| --- | --- | --- | --- |"]
    for router, entry in pool["policies"].items():
        a = entry["argmax_p"]
        gaps = ", ".join(f"{n} {v:+.3f}" for n, v in entry["mean_p_minus_accuracy"].items())
        lines.append(f"| {router} | {a['accuracy']:.3f} | {'yes' if a['reaches_best_single'] else 'no'} | {gaps} |")
    margins = [(router, entry["argmax_p_margin"]) for router, entry in pool["policies"].items()
               if "argmax_p_margin" in entry]
    if margins:
        toward = margins[0][1]["toward"]
        lines += ["", f"argmax p held to {toward} unless another estimate beats its own by more than a margin "
                  "(`policy.margin` with it as `policy.fallback`, utility mode, λ = 0): accuracy by margin.", "",
                  "| router | " + " | ".join(f"margin {m['margin']:g}" for m in margins[0][1]["margins"])
                  + " | smallest reaching the best single |",
                  "| --- |" + " --- |" * (len(margins[0][1]["margins"]) + 1)]
        for router, m in margins:
            smallest = m["smallest_reaching_best_single"]
            lines.append(f"| {router} | " + " | ".join(f"{x['accuracy']:.3f}" for x in m["margins"])
                         + f" | {'none' if smallest is None else f'{smallest:g}'} |")
    if pool.get("plot"):
        lines += ["", f"![pool frontier]({pool['plot']})", ""]
    return lines


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{v + 0.0:.1%}"  # + 0.0: no "-0.0%"


@dataclass(frozen=True)
class PoolEstimates:
    """Held-out success estimates of every labelled backend on the data a threshold is chosen on."""

    names: list[str]
    y: np.ndarray  # (n, k) 0/1
    p: np.ndarray  # (n, k)
    cost: np.ndarray  # (n, k) USD per request
    fallback: int | None
    training_base_rate: dict[str, float]
    base_rate: dict[str, float]
    n_training: int

    @property
    def cheap(self) -> int:
        return int(np.argmin(self.cost.mean(axis=0)))

    @property
    def dear(self) -> int:
        return int(np.argmax(self.cost.mean(axis=0)))

    def threshold_frontier(self) -> Frontier:
        """The gateway's threshold policy over all backends as a frontier (thresholds, dearest backend's share)."""
        pts = threshold_frontier(self.p, self.y, self.cost, self.names, fallback=self.fallback, points=2000)
        return Frontier(thresholds=pts.knob, dear_share=pts.shares[:, self.dear], accuracy=pts.accuracy,
                        cost=pts.cost, cheap_accuracy=float(self.y[:, self.cheap].mean()),
                        dear_accuracy=float(self.y[:, self.dear].mean()))

    def at_threshold(self, threshold: float) -> dict[str, Any]:
        """Expected share of requests per backend and accuracy at ``threshold``."""
        choice = threshold_choices(self.p, self.cost, self.names, threshold, self.fallback)
        rows = np.arange(len(choice))
        return {"share": {n: round(float(np.mean(choice == i)), 4) for i, n in enumerate(self.names)},
                "accuracy": round(float(self.y[rows, choice].mean()), 4),
                "cost_per_request": float(self.cost[rows, choice].mean())}

    def base_rate_shifts(self) -> list[str]:
        """Backends whose success rate differs between training and calibration data by more than chance
        (beyond 3 standard errors of the difference)."""
        if not self.n_training:
            return []
        n1, n2 = self.n_training, len(self.y)
        out = []
        for name in self.names:
            a, b = self.training_base_rate[name], self.base_rate[name]
            pooled = (a * n1 + b * n2) / (n1 + n2)
            se = np.sqrt(max(pooled * (1 - pooled), 1e-12) * (1 / n1 + 1 / n2))
            if abs(a - b) > 3 * se:
                out.append(f"{name}: {a:.3f} right in the training data, {b:.3f} in the calibration data")
        return out


def pool_estimates(
    settings: Settings, dataset: Dataset, *, calibration: Dataset | None = None, text: str = "none",
    folds: int = 5, seed: int = 0, label_keys: dict[str, str] | None = None,
    train_keys: dict[str, list[str]] | None = None, progress: bool = True,
) -> PoolEstimates:
    """Every labelled backend's held-out estimates: nested out-of-fold on ``dataset``, or, with
    ``calibration``, probes trained on ``dataset`` applied to ``calibration`` (whose labels then count)."""
    label_keys, train_keys = label_keys or {}, train_keys or {}
    model, grid = probe_model(text)
    x, extractor = probe_inputs(settings.scorer, dataset, text, progress=progress)
    scored = calibration or dataset
    x_cal = None if calibration is None else probe_inputs(settings.scorer, calibration, text, scorer=extractor,
                                                          progress=progress)[0]
    lengths = np.array([len(extractor.encoder.encode(c)) for c in scored.conversations()], dtype=float)
    usable = labelled_backends(settings, dataset, label_keys)
    if calibration is not None:
        in_cal = {b.name for b, _ in labelled_backends(settings, calibration, label_keys)}
        usable = [(b, y) for b, y in usable if b.name in in_cal]
    if len(usable) < 2:
        raise ValueError("calibration needs labels for at least two backends of the config")
    names, ys, ps, costs = [], [], [], []
    for b, y_train in usable:
        key = label_keys.get(b.name, b.model)
        train = [dataset.training_labels(k) for k in train_keys.get(b.name, [key])]
        est = held_out(x, train, y_train, x_test=x_cal, cs=grid, folds=folds, seed=seed, model=model)
        names.append(b.name)
        ys.append(scored.labels(key))
        ps.append(est.probability)
        costs.append(estimate_costs(scored, b, lengths, settings.policy.expected_output_tokens)[0])
    y = np.stack(ys, axis=1)
    fallback = names.index(settings.policy.fallback) if settings.policy.fallback in names else None
    train_rates = {b.name: float(y_train.mean()) for b, y_train in usable}
    return PoolEstimates(names, y, np.stack(ps, axis=1), np.stack(costs, axis=1), fallback, train_rates,
                         {n: float(y[:, i].mean()) for i, n in enumerate(names)},
                         len(dataset.records) if calibration is not None else 0)
