"""Research comparison (not part of the package): held-out AUROC of feature recipes, paired on the same questions.

Usage, from the repository root:
    .venv/bin/python research/probes/paired.py --data data/gsm8k_test_qwen25math.jsonl \
        --recipe 15:last:none --recipe 4:mean:tfidf+length \
        --train-labels qwen2.5-math-7b=Qwen/Qwen2.5-Math-1.5B-Instruct [--share-labels] [--test TEST.jsonl] [--config C]

Each recipe is LAYERS:POOLING:TEXT[:LABELS] (LAYERS comma-separated); LABELS names a set of training labels
given by --labels LABELS:BACKEND=KEY[+KEY...] (repeatable; e.g. success rates of k sampled answers), in place of
--train-labels / --share-labels for that recipe. Every recipe gets the probe pipeline's own protocol
(``probes.evaluate.held_out``: nested cross-validation on --data, or trained on --data and scored on --test,
same folds and seed), so each question has one held-out estimate per recipe. The report is each recipe's AUROC
per backend and its difference from the first recipe with a 95% interval from a paired bootstrap (the same
resampled questions for both), which is far narrower than the two separate intervals: it says whether a
cheaper recipe costs more than a bound such as issue 14's 0.005. Prints one JSON line per recipe.
"""
import argparse
import json
import time
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from probes import Dataset, held_out, labelled_backends, load_dataset, probe_inputs, probe_model, shared_keys
from router import load_settings
from router.scorer import configure_openmp


def against_first(y: np.ndarray, p: np.ndarray, first: np.ndarray, resamples: list[np.ndarray]) -> dict[str, object]:
    """AUROC of ``p`` minus that of ``first`` on the same questions, with a 95% paired-bootstrap interval."""
    diffs = [roc_auc_score(y[i], p[i]) - roc_auc_score(y[i], first[i]) for i in resamples if 0 < y[i].sum() < len(i)]
    return {"minus_first": round(roc_auc_score(y, p) - roc_auc_score(y, first), 4),
            "minus_first_ci95": [round(float(v), 4) for v in np.percentile(diffs, [2.5, 97.5])]}


def per_backend(x: Any, x_test: Any, text: str, *, data: Dataset, scored: Dataset, backends: list, keys: dict,
                folds: int, seed: int, first: dict[str, np.ndarray], resamples: list[np.ndarray]) -> dict[str, object]:
    """Each backend's held-out AUROC for one recipe's inputs, and its difference from the first recipe's (whose
    estimates ``first`` keeps)."""
    model, grid = probe_model(text)
    row: dict[str, object] = {}
    for b, y_train in backends:
        y = scored.labels(b.model)
        ys = [data.training_labels(k) for k in keys.get(b.name, [b.model])]
        p = held_out(x, ys, y_train, x_test=x_test, cs=grid, model=model, folds=folds, seed=seed).probability
        entry: dict[str, object] = {"auroc": round(roc_auc_score(y, p), 4)}
        if b.name not in first:
            first[b.name] = p
        else:
            entry |= against_first(y, p, first[b.name], resamples)
        row[b.name] = entry
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="config.yaml")
    parser.add_argument("--data", required=True)
    parser.add_argument("--test")
    parser.add_argument("--recipe", action="append", required=True)
    parser.add_argument("--train-labels", action="append", default=[], metavar="BACKEND=KEY[+KEY...]")
    parser.add_argument("--share-labels", action="store_true")
    parser.add_argument("--labels", action="append", default=[], metavar="LABELS:BACKEND=KEY[+KEY...]")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bootstrap", type=int, default=2000)
    args = parser.parse_args()

    settings = load_settings(args.config)
    configure_openmp(settings.scorer)
    data = load_dataset(args.data)
    test = load_dataset(args.test) if args.test else None
    scored = test or data
    train_keys = shared_keys(settings, data, {}) if args.share_labels else {}
    train_keys |= {i.split("=", 1)[0]: i.split("=", 1)[1].split("+") for i in args.train_labels}
    label_sets: dict[str, dict[str, list[str]]] = {}
    for item in args.labels:
        name, rest = item.split(":", 1)
        label_sets.setdefault(name, {})[rest.split("=", 1)[0]] = rest.split("=", 1)[1].split("+")
    backends = labelled_backends(settings, data, {})
    rng = np.random.default_rng(args.seed)
    resamples = [rng.integers(0, len(scored.records), len(scored.records)) for _ in range(args.bootstrap)]

    first: dict[str, np.ndarray] = {}
    for spec in args.recipe:
        layers, pooling, text, *named = spec.split(":")
        keys = label_sets[named[0]] if named else train_keys
        cfg = settings.scorer.model_copy(update={"layers": [int(v) for v in layers.split(",")], "pooling": pooling})
        start = time.time()
        x, scorer = probe_inputs(cfg, data, text, progress=False)
        x_test = None if test is None else probe_inputs(cfg, test, text, scorer=scorer, progress=False)[0]
        row: dict[str, object] = {"recipe": spec}
        row |= per_backend(x, x_test, text, data=data, scored=scored, backends=backends, keys=keys,
                           folds=args.folds, seed=args.seed, first=first, resamples=resamples)
        row["s"] = round(time.time() - start)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
