"""Research screen (not part of the package): does a probe trained on the *difference* of two models' outcomes
choose better which questions to move from the best single model to another than the difference of two
separately trained probes does? (2026-12-06; docs/probes "Not tried: estimating the difference p_i − p_best".)

On MATH the best single model (Qwen2.5-Math-1.5B-Instruct) is also a cheapest one, and argmax over separately
trained probes loses accuracy to it (a winner's curse). For each other model j, with d = y_j − y_best in
{−1, 0, +1} per question:
- ``separate``: two standardised logistic probes, one per model on its own labels; score p_j − p_best;
- ``direct``: one multinomial logistic probe on d; score P(d = +1) − P(d = −1), the expected accuracy change of
  moving the question to j.
Both read block 15, last + mean (token_pooling.py's features), C by inner 3-fold CV (LogisticRegressionCV),
out of fold over KFold(3, seed 0). Moving the k questions with the highest score changes accuracy by the sum of
their d; the screen prints the best change over k (and the share moved there), and the change at 5% and 10%
moved, for each way of scoring.

Usage, from the repository root (features from ``token_pooling.py extract``):
    .venv/bin/python research/probes/pairwise_switch.py ../shared/data/math_train_pool.jsonl /tmp/tp_math.npy
"""
import json
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegressionCV
from sklearn.model_selection import KFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from probes import load_dataset

BEST = "Qwen/Qwen2.5-Math-1.5B-Instruct"
OTHERS = ["Qwen/Qwen2.5-1.5B-Instruct", "Qwen/Qwen2.5-Math-7B-Instruct", "Qwen/Qwen2.5-7B-Instruct"]
CS = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]


def probe() -> object:
    return make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=CS, cv=3, max_iter=3000))


def moved(score: np.ndarray, d: np.ndarray) -> dict:
    gain = np.cumsum(d[np.argsort(-score)]) / len(d)
    k = int(np.argmax(gain))
    return {"best_change": round(float(gain[k]), 4), "share_moved": round((k + 1) / len(d), 3),
            "change_at_5pct": round(float(gain[len(d) // 20 - 1]), 4),
            "change_at_10pct": round(float(gain[len(d) // 10 - 1]), 4)}


def main(data_path: str, features: str) -> None:
    data = load_dataset(data_path)
    meta = json.loads(Path(features.removesuffix(".npy") + ".json").read_text())
    w = meta["width"]
    x = np.load(features, mmap_mode="r")[:, :2 * w].astype(np.float64)  # last, then the mean of every token
    y_best = data.labels(BEST)
    folds = list(KFold(3, shuffle=True, random_state=0).split(x))
    p_best = np.zeros(len(x))
    for train, test in folds:
        p_best[test] = probe().fit(x[train], y_best[train]).predict_proba(x[test])[:, 1]
    for other in OTHERS:
        start = time.time()
        y = data.labels(other)
        d = y - y_best
        p_j, direct = np.zeros(len(x)), np.zeros(len(x))
        for train, test in folds:
            p_j[test] = probe().fit(x[train], y[train]).predict_proba(x[test])[:, 1]
            m = probe().fit(x[train], d[train])
            prob = m.predict_proba(x[test])
            classes = list(m.classes_)
            direct[test] = prob[:, classes.index(1)] - prob[:, classes.index(-1)]
        row = {"best": BEST.split("/")[1], "other": other.split("/")[1],
               "accuracy_best": round(float(y_best.mean()), 4),
               "accuracy_other": round(float(y.mean()), 4), "oracle_change": round(float((d > 0).mean()), 4),
               "separate": moved(p_j - p_best, d), "direct": moved(direct, d), "s": round(time.time() - start)}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
