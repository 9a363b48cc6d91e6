"""Research screen (not part of the package): do the GSM8K probes gain from MATH questions labelled by the same
models (2026-12-05)?

The embedded default routes between Qwen2.5-Math-1.5B-Instruct and Qwen2.5-Math-7B-Instruct. GSM8K has 1,319
test and 7,473 training questions labelled by both; the MATH training split has 7,500 more labelled by the same
two models. This screen adds the MATH rows to every training fold (never to what is scored) and measures
AUROC on GSM8K only, with the default's features (config.yaml: block 15, last token, activations only) and
the shipped labels (the 7B probe learns from the 1.5B model's labels, as shipped). Protocols: GSM8K test,
5-fold CV (outer KFold seed 0, C by 5-fold inner CV on the GSM8K rows of each fold); GSM8K train -> test (C by
5-fold CV on train). AUROC from the standardised logistic's decision, no Platt (AUROC does not need it).

Usage, from the repository root:
    .venv/bin/python research/probes/cross_benchmark.py [ALL]
Prints one JSON line per model x recipe; results in ``cross_benchmark.jsonl``. With ALL the MATH rows carry
every MATH label set of both models (greedy and k-sample success rates) instead of the 1.5B greedy labels.
"""
import json
import sys
import time

import numpy as np
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import KFold

from probes import StandardisedLogistic, load_dataset, probe_inputs
from router import load_settings
from router.scorer import configure_openmp

DATA = "../shared/data"
SMALL, BIG = "Qwen/Qwen2.5-Math-1.5B-Instruct", "Qwen/Qwen2.5-Math-7B-Instruct"
CS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1)


def features(name: str) -> tuple[np.ndarray, object]:
    settings = load_settings("config.yaml")
    configure_openmp(settings.scorer)
    dataset = load_dataset(f"{DATA}/{name}")
    x, _ = probe_inputs(settings.scorer, dataset, "none", progress=False)
    return np.asarray(x, dtype=np.float64), dataset


def fit(x: np.ndarray, ys: list[np.ndarray], extra: tuple[np.ndarray, list[np.ndarray]] | None, c: float):
    """One probe on (x, each label set stacked), with the extra rows and their label sets stacked beside."""
    if extra is None:
        return StandardisedLogistic().fit_path(x, ys, [c])[0]
    xe, yes = extra
    # every label set covers all rows: pair the GSM8K sets with the MATH sets in turn, repeating the shorter list
    n = max(len(ys), len(yes))
    stacked = [np.concatenate([ys[i % len(ys)], yes[i % len(yes)]]) for i in range(n)]
    return StandardisedLogistic().fit_path(np.vstack([x, xe]), stacked, [c])[0]


def choose_c(x, ys, y, extra, seed: int = 0) -> float:
    inner = list(KFold(5, shuffle=True, random_state=seed).split(x))
    scores = []
    for c in CS:
        scores.append(np.mean([roc_auc_score(y[b], fit(x[a], [v[a] for v in ys], extra, c).decision(x[b]))
                               for a, b in inner]))
    return CS[int(np.argmax(scores))]


def run() -> None:
    every = len(sys.argv) > 1 and sys.argv[1] == "ALL"
    x_test, test = features("gsm8k_test_qwen25math.jsonl")
    x_train, train = features("gsm8k_train_qwen25math.jsonl")
    x_math, math = features("math_train_pool.jsonl")
    keys = [k for k in math.label_sets() if k.split("@")[0] in (SMALL, BIG)] if every else [SMALL]
    math_extra = (x_math, [math.training_labels(k) for k in keys])
    recipes = {"gsm8k only": None, f"+ MATH ({len(keys)} label sets)": math_extra}
    for target in (SMALL, BIG):
        label = SMALL  # as shipped: the 7B probe learns from the 1.5B model's labels
        for name, extra in recipes.items():
            start = time.time()
            # GSM8K test, 5-fold CV
            y, yl = test.labels(target), test.labels(label)
            oof = np.zeros(len(y))
            for a, b in KFold(5, shuffle=True, random_state=0).split(x_test):
                c = choose_c(x_test[a], [yl[a]], y[a], extra)
                oof[b] = fit(x_test[a], [yl[a]], extra, c).decision(x_test[b])
            cv = roc_auc_score(y, oof)
            # GSM8K train -> test
            c = choose_c(x_train, [train.labels(label)], train.labels(target), extra)
            tt = roc_auc_score(y, fit(x_train, [train.labels(label)], extra, c).decision(x_test))
            print(json.dumps({"model": target.split("/")[1], "recipe": name, "gsm8k_test_cv": round(cv, 4),
                              "gsm8k_train_to_test": round(tt, 4), "C_train_to_test": c,
                              "s": round(time.time() - start)}), flush=True)


if __name__ == "__main__":
    run()
