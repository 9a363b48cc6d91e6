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

from probes.data import Dataset
from probes.extract import extract_features
from probes.fit import DEFAULT_CS, TfidfLogistic, nested_oof
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
from router.config import BackendConfig, Settings

log = logging.getLogger(__name__)

TFIDF_CS: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)


@dataclass(frozen=True)
class Estimates:
    name: str
    probability: np.ndarray
    chosen: list[Any] | None = None


def _quality(y: np.ndarray, p: np.ndarray, rounds: int, seed: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, fn in (("auroc", auroc), ("brier", brier), ("ece", ece)):
        value = fn(y, p)
        lo, hi = bootstrap_ci(lambda idx, fn=fn: fn(y[idx], p[idx]), len(y), rounds=rounds, seed=seed)
        out[name] = round(value, 4)
        out[f"{name}_ci95"] = [round(lo, 4), round(hi, 4)]
    return out


def estimate_costs(
    dataset: Dataset, backend: BackendConfig, prompt_tokens: np.ndarray, output_tokens: int,
) -> tuple[np.ndarray, str]:
    """Per-question cost of calling ``backend``: the data's measured ``cost[model]`` where every record has
    one, else prompt tokens (the scorer's count) and ``output_tokens`` at the backend's prices."""
    measured = [(r.get("cost") or {}).get(backend.model) for r in dataset.records]
    if all(v is not None for v in measured):
        return np.array(measured, dtype=np.float64), "measured"
    est = (prompt_tokens * backend.input_cost_per_mtok + output_tokens * backend.output_cost_per_mtok) / 1e6
    return est.astype(np.float64), f"estimated: scorer-token prompt length + {output_tokens} output tokens"


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


def evaluate(
    settings: Settings, dataset: Dataset, out_dir: Path, *, folds: int = 5, seed: int = 0, rounds: int = 1000,
    cs: Sequence[float] = DEFAULT_CS, label_keys: dict[str, str] | None = None,
    train_keys: dict[str, list[str]] | None = None, command: str = "", progress: bool = True,
) -> dict[str, Any]:
    """Write ``out_dir/report.json``, ``report.md`` and ``frontier.png``; return the report."""
    label_keys, train_keys = label_keys or {}, train_keys or {}
    features, extractor = extract_features(settings.scorer, dataset, progress=progress)
    lengths = np.array([len(extractor.encoder.encode(c)) for c in dataset.conversations()], dtype=np.float64)
    texts = np.array(dataset.questions, dtype=object)
    usable = labelled_backends(settings, dataset, label_keys)
    if not usable:
        raise ValueError("no backend of the config has labels in the data")
    bar = tqdm(total=3 * len(usable), desc="nested CV", unit="model", disable=not progress)
    report: dict[str, Any] = {
        "command": command,
        "data": {"path": str(dataset.path), "sha256_16": dataset.digest(), "n": len(dataset.records)},
        "scorer": extractor.info.recipe() | {"model": extractor.info.model, "fingerprint": extractor.info.fingerprint},
        "folds": folds, "seed": seed, "bootstrap_rounds": rounds, "C_grid": list(cs),
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "backends": {},
    }
    estimates: dict[str, dict[str, np.ndarray]] = {}
    for b, y in usable:
        key = label_keys.get(b.name, b.model)
        ys = [dataset.labels(k) for k in train_keys.get(b.name, [key])]
        probe = nested_oof(features, ys, y, cs=cs, folds=folds, seed=seed)
        bar.update()
        length = nested_oof(-lengths.reshape(-1, 1), [y], y, cs=cs, folds=folds, seed=seed)
        bar.update()
        tfidf = nested_oof(texts, [y], y, cs=TFIDF_CS, folds=folds, seed=seed, model=TfidfLogistic())
        bar.update()
        entry: dict[str, Any] = {
            "label": key, "trained_on": train_keys.get(b.name, [key]), "n": len(y),
            "base_rate": round(float(y.mean()), 4),
            **_quality(y, probe.probability, rounds, seed),
            "C_per_fold": probe.chosen,
            "baselines": {
                "prompt_length": _quality(y, length.probability, rounds, seed),
                "tfidf_logreg": _quality(y, tfidf.probability, rounds, seed) | {"C_per_fold": tfidf.chosen},
            },
        }
        est = {"probe": probe.probability, "prompt_length": length.probability, "tfidf_logreg": tfidf.probability}
        reference = dataset.reference(key)
        if reference is not None:
            entry["reference_paper_probe"] = _quality(y, reference, rounds, seed)
            est["paper_probe"] = reference
        report["backends"][b.name] = entry
        estimates[b.name] = est
    bar.close()
    if len(usable) >= 2:
        report["routing"] = _routing(settings, dataset, usable, estimates, lengths, out_dir, rounds, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "report.md").write_text(render_markdown(report))
    return report


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


def render_markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Probe evaluation",
        "",
        f"`{report['command']}`" if report.get("command") else "",
        "",
        f"Data: `{report['data']['path']}` ({report['data']['n']} questions). Scorer: {report['scorer']['model']}, "
        f"layers {report['scorer']['layers']}, pooling {report['scorer']['pooling']}. "
        f"{report['folds']}-fold nested cross-validation, seed {report['seed']}; "
        f"95% intervals from {report['bootstrap_rounds']} bootstrap resamples of the questions.",
        "",
        "## Success estimates (out-of-fold)",
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
    return "\n".join(lines) + "\n"


def cheap_frontier(
    settings: Settings, dataset: Dataset, *, folds: int = 5, seed: int = 0, cs: Sequence[float] = DEFAULT_CS,
    label_keys: dict[str, str] | None = None, train_keys: dict[str, list[str]] | None = None,
    progress: bool = True,
) -> tuple[Frontier, str, str]:
    """The routing frontier of the cheapest backend's nested out-of-fold estimates: (frontier, cheap, dear)."""
    label_keys, train_keys = label_keys or {}, train_keys or {}
    features, extractor = extract_features(settings.scorer, dataset, progress=progress)
    lengths = np.array([len(extractor.encoder.encode(c)) for c in dataset.conversations()], dtype=float)
    usable = labelled_backends(settings, dataset, label_keys)
    if len(usable) < 2:
        raise ValueError("calibration needs labels for at least two backends of the config")
    out_tokens = settings.policy.expected_output_tokens
    costs = {b.name: estimate_costs(dataset, b, lengths, out_tokens)[0] for b, _ in usable}
    cheap, y_cheap = min(usable, key=lambda t: costs[t[0].name].mean())
    dear, y_dear = max(usable, key=lambda t: costs[t[0].name].mean())
    key = label_keys.get(cheap.name, cheap.model)
    ys = [dataset.labels(k) for k in train_keys.get(cheap.name, [key])]
    p = nested_oof(features, ys, y_cheap, cs=cs, folds=folds, seed=seed).probability
    return routing_frontier(p, y_cheap, y_dear, costs[cheap.name], costs[dear.name]), cheap.name, dear.name
