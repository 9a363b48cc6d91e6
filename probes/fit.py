"""Fitting one probe: standardised L2 logistic regression, C chosen by inner cross-validation, Platt on
out-of-fold scores. Everything is seeded; the same inputs give the same probe."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from router.probe import Probe

DEFAULT_CS: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def _pipeline(c: float = 1.0) -> Pipeline:
    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000))


def choose_c(x: np.ndarray, y: np.ndarray, cs: Sequence[float], folds: int, seed: int) -> float:
    """The C with the best mean AUROC over an inner stratified K-fold split of (x, y)."""
    search = GridSearchCV(
        _pipeline(), {"logisticregression__C": list(cs)}, scoring="roc_auc",
        cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
    )
    search.fit(x, y)
    return float(search.best_params_["logisticregression__C"])


def fit_logistic(x: np.ndarray, y: np.ndarray, c: float) -> Pipeline:
    return _pipeline(c).fit(x, y)


def out_of_fold_scores(
    x: np.ndarray, y: np.ndarray, cs: Sequence[float], folds: int, seed: int
) -> tuple[np.ndarray, list[float]]:
    """Logits for every row from a model that never saw it; C re-chosen inside each outer fold (nested CV)."""
    scores = np.zeros(len(y))
    chosen = []
    outer = StratifiedKFold(folds, shuffle=True, random_state=seed)
    for train, test in outer.split(x, y):
        c = choose_c(x[train], y[train], cs, folds, seed)
        chosen.append(c)
        scores[test] = fit_logistic(x[train], y[train], c).decision_function(x[test])
    return scores, chosen


def fit_platt(scores: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(a, b) so that sigmoid(a·z + b) is calibrated on held-out logits z."""
    lr = LogisticRegression(C=1e6, max_iter=1000).fit(scores.reshape(-1, 1), y)
    return float(lr.coef_[0, 0]), float(lr.intercept_[0])


@dataclass(frozen=True)
class FittedProbe:
    probe: Probe
    oof_probability: np.ndarray  # calibrated out-of-fold estimates, one per training row
    c: float
    oof_auroc: float


def fit_probe(
    x: np.ndarray, y: np.ndarray, *, cs: Sequence[float] = DEFAULT_CS, folds: int = 5, seed: int = 0,
) -> FittedProbe:
    """A calibrated probe fitted on all of (x, y), with honest out-of-fold estimates beside it."""
    if len(np.unique(y)) < 2:
        raise ValueError("labels must contain both successes and failures")
    oof, _ = out_of_fold_scores(x, y, cs, folds, seed)
    a, b = fit_platt(oof, y)
    c = choose_c(x, y, cs, folds, seed)
    model = fit_logistic(x, y, c)
    scaler: StandardScaler = model.named_steps["standardscaler"]
    lr: LogisticRegression = model.named_steps["logisticregression"]
    probe = Probe(
        mean=scaler.mean_.astype(np.float64),
        scale=scaler.scale_.astype(np.float64),
        weight=lr.coef_[0].astype(np.float64),
        bias=float(lr.intercept_[0]),
        platt_a=a,
        platt_b=b,
    )
    oof_p = 1.0 / (1.0 + np.exp(-(a * oof + b)))
    return FittedProbe(probe, oof_p, c, float(roc_auc_score(y, oof)))
