"""Screen: which rule for choosing the cascade's margins holds its agreement with the full probes on held-out
data, and at what share decided by the cheap stages. Every rule sees only the training rows' inner out-of-fold
estimates (as ``probes train``); the held-out rows are routed with the margins it chose.

Rules:
- ``budget``: the first shipped chooser (``probes.cascade.choose_margins`` with ``confidence_z=0``): the least
  compute whose disagreements on the training rows stay within (1 − agreement) of them.
- ``budget-ucb``: the same with the budget cut so that a one-sided 95% bound on the disagreement rate
  (e + 1.645·√e over n) stays within it (``choose_margins``' default, chosen by this screen: README.md).
- ``error-quantile``: each stage's margin is the ``agreement`` quantile of its largest error over the backends,
  max_j |p_stage − p_full|: a decision at a radius beyond it is wrong only where the error exceeds it, whatever
  the threshold and wherever the estimates sit.

    python research/cascade/margin_rules.py --config config.yaml --data $DATA/gsm8k_train_qwen25math.jsonl \
        --test $DATA/gsm8k_test_qwen25math.jsonl --train-labels qwen2.5-math-7b=Qwen/Qwen2.5-Math-1.5B-Instruct

Prints one JSON line per (rule, agreement): the config's operating point and the frontier's mean and least
agreement, mean shares decided, and APGR (two backends) or accuracy at equal cost, beside the full probes'.
"""

from __future__ import annotations

import argparse
import json
import pickle
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import StratifiedKFold

from probes.cascade import (  # private on purpose: screen
    choose_margins,
    decisions,
    early_layer_for,
    policy_rule,
    route,
    stage_costs,
)
from probes.cascade_eval import (  # private on purpose: screen
    Fold,
    Routed,
    _at,
    _points,
    _policy_apgr,
    accuracy_at_equal_cost,
    fit_folds,
)
from probes.cli import _label_keys, _train_keys  # private on purpose: screen
from probes.data import load_dataset  # private on purpose: screen
from probes.evaluate import estimate_costs, labelled_backends  # private on purpose: screen
from probes.extract import extract_features  # private on purpose: screen
from router.config import load_settings  # private on purpose: screen
from router.scorer.cpu import configure_openmp  # private on purpose: screen


def margins_by(rule_name: str, full: np.ndarray, stages: dict, p: dict, agreement: float, compute: dict) -> dict:
    if rule_name == "budget":
        return choose_margins(full, stages, agreement=agreement, cost=compute, confidence_z=0.0).margins
    if rule_name == "budget-ucb":  # probes.cascade.choose_margins' default since this screen
        return choose_margins(full, stages, agreement=agreement, cost=compute, confidence_z=1.645).margins
    if rule_name == "error-quantile":
        return {s: float(np.quantile(np.abs(p[s] - p["full"]).max(axis=1), agreement)) for s in stages}
    raise ValueError(rule_name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--test")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--text-features", default="none")
    ap.add_argument("--train-labels", action="append", default=[])
    ap.add_argument("--share-labels", choices=["all"])
    ap.add_argument("--agreement", default="0.99,0.995")
    ap.add_argument("--rules", default="budget,budget-ucb,error-quantile")
    ap.add_argument("--points", type=int, default=41)
    ap.add_argument("--cache", help="pickle of the fitted folds (written if missing)")
    ap.add_argument("--rows-cv", type=int, metavar="K",
                    help="with --cache of a fit on all of --data (a --test run): screen the rules by K-fold CV of the "
                         "training rows' inner out-of-fold estimates alone (the margins chosen on K-1 folds' rows, "
                         "the K-th routed); nothing of --test is read but the fitted models' pickle")
    args = ap.parse_args()
    settings = load_settings(args.config)
    configure_openmp(settings.scorer)
    dataset = load_dataset(args.data)
    if args.rows_cv and not (args.cache and Path(args.cache).is_file()):
        ap.error("--rows-cv needs --cache of an existing fit")
    test = load_dataset(args.test) if args.test and not args.rows_cv else None
    scored = test or dataset
    train_keys = _train_keys(args.train_labels)
    if args.share_labels == "all":
        train_keys = {b.name: dataset.label_sets() for b in settings.backends} | train_keys
    usable = labelled_backends(settings, dataset, {})
    names = [b.name for b, _ in usable]
    y = np.stack([scored.labels(b.model) for b, _ in usable], axis=1).astype(np.float64)
    encoder = extract_features(settings.scorer, dataset, progress=False)[1].encoder
    out_tokens = settings.policy.expected_output_tokens

    def costs(d: Any) -> np.ndarray:
        tokens = np.array([len(encoder.encode(c)) for c in d.conversations()], dtype=np.float64)
        return np.stack([estimate_costs(d, b, tokens, out_tokens)[0] for b, _ in usable], axis=1)

    cost_train, cost_held = costs(dataset), costs(scored)
    early = early_layer_for(settings)
    cache = Path(args.cache) if args.cache else None
    if cache is not None and cache.is_file():
        folds = pickle.loads(cache.read_bytes())
        if args.rows_cv:  # the training rows' inner out-of-fold estimates, split again; the test estimates dropped
            whole = folds[0]
            if len(whole.train) != len(dataset.records):
                ap.error("--rows-cv needs the pickle of a fit on all of --data")
            together = y.sum(axis=1)
            split = StratifiedKFold(args.rows_cv, shuffle=True, random_state=0).split(np.zeros(len(y)), together)
            folds = [Fold(whole.train[tr], whole.train[te], {s: v[tr] for s, v in whole.inner.items()},
                          {s: v[te] for s, v in whole.inner.items()}) for tr, te in split]
    else:
        folds = fit_folds(settings, dataset, usable, test=test, text=args.text_features, early_layer=early,
                          folds=args.folds, seed=0, label_keys=_label_keys([]), train_keys=train_keys,
                          progress=False)
        if cache is not None:
            cache.write_bytes(pickle.dumps(folds))
    stages = [s for s in ("text", "early") if s in folds[0].inner]
    compute = stage_costs(settings.scorer, early if "early" in stages else None)
    base = policy_rule(settings.policy)
    n = len(y)
    held_full = np.zeros((n, len(names)))
    for f in folds:
        held_full[f.held] = f.estimates["full"]
    if base.mode == "utility":
        rules = [base] + [replace(base, cost_weight=float(k)) for k in np.geomspace(1e-3, 5.0, args.points - 1)]
    else:
        rules = [base] + [replace(base, threshold=float(t)) for t in
                          np.unique(np.concatenate([[0.0, 1.0 + 1e-9],
                                                    np.quantile(held_full, np.linspace(0, 1, args.points))]))]
    fold_of = np.zeros(n, dtype=np.int64)
    for i, f in enumerate(folds):
        fold_of[f.held] = i

    def per_fold(r: Routed) -> np.ndarray:  # agreement in each outer fold's held-out rows
        return np.array([np.mean(r.cascade[fold_of == i] == r.full[fold_of == i]) for i in range(len(folds))])

    def blocks(r: Routed) -> float:  # scorer blocks run, as a share of the full pass
        return float(sum(np.mean(r.by == i) * compute[s] for i, s in enumerate([*stages, "full"])))

    for rule_name in args.rules.split(","):
        for agreement in (float(a) for a in args.agreement.split(",")):
            routed = []
            for r in rules:
                full_all, cascade_all, by_all = (np.zeros(n, dtype=np.int64) for _ in range(3))
                margins_here = []
                for f in folds:
                    ct, ch = cost_train[f.train], cost_held[f.held]
                    full_t = decisions(f.inner["full"], ct, names, r)[0]
                    st = {s: decisions(f.inner[s], ct, names, r) for s in stages}
                    m = margins_by(rule_name, full_t, st, f.inner, agreement, compute)
                    margins_here.append({k: round(v, 4) for k, v in m.items()})
                    full_h = decisions(f.estimates["full"], ch, names, r)[0]
                    choice, by = route(full_h, {s: decisions(f.estimates[s], ch, names, r) for s in stages}, m)
                    full_all[f.held], cascade_all[f.held], by_all[f.held] = full_h, choice, by
                knob = r.cost_weight if r.mode == "utility" else r.threshold
                routed.append(Routed(knob, full_all, cascade_all, by_all, margins_here))
            here, sweep = routed[0], routed[1:]
            cp, fp = _points(sweep, "cascade", y, cost_held), _points(sweep, "full", y, cost_held)
            agree = np.array([np.mean(r.cascade == r.full) for r in sweep])
            line = {
                "rule": rule_name, "agreement_target": agreement,
                "at_policy": {"agreement": round(float(np.mean(here.cascade == here.full)), 4),
                              "decided": {s: round(float(np.mean(here.by == i)), 4)
                                          for i, s in enumerate([*stages, "full"])},
                              "accuracy": round(_at(here.cascade, y, cost_held)[0], 4),
                              "full_accuracy": round(_at(here.full, y, cost_held)[0], 4),
                              "agreement_least_fold": round(float(per_fold(here).min()), 4),
                              "blocks": round(blocks(here), 4), "margins": here.margins},
                "frontier": {"agreement_mean": round(float(agree.mean()), 4),
                             "agreement_least": round(float(agree.min()), 4),
                             "agreement_mean_least_fold": round(float(np.mean([per_fold(r) for r in sweep],
                                                                               axis=0).min()), 4),
                             "blocks_mean": round(float(np.mean([blocks(r) for r in sweep])), 4),
                             "decided_mean": {s: round(float(np.mean([np.mean(r.by == i) for r in sweep])), 4)
                                              for i, s in enumerate([*stages, "full"])},
                             "accuracy_at_equal_cost": accuracy_at_equal_cost(cp, fp)},
            }
            if len(names) == 2:
                cheap, dear = int(np.argmin(cost_held.mean(0))), int(np.argmax(cost_held.mean(0)))
                line["frontier"]["apgr"] = {"cascade": round(_policy_apgr(cp, y, cheap, dear), 4),
                                            "full": round(_policy_apgr(fp, y, cheap, dear), 4)}
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
