"""Fitting one probe: standardised L2 logistic regression, C chosen by inner cross-validation, Platt on
out-of-fold scores. Everything is seeded; the same inputs give the same probe.

A probe may be trained on several label sets at once (``ys``: the rows are stacked once per set, e.g. a dear
backend's probe learning from the cheap backend's more numerous failures as well as its own), while C is
chosen, Platt is fitted and AUROC is measured against one ``target`` label set: the backend's own.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sklearn.preprocessing import StandardScaler

from router.probe import Probe

DEFAULT_CS: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


class Scorer(Protocol):
    def decision(self, x: Any) -> np.ndarray: ...


class Model(Protocol):
    """Fits one scorer per C (ascending, warm-started) on training rows and their stacked label sets."""

    def fit_path(self, x: Any, ys: Sequence[np.ndarray], cs: Sequence[float]) -> list[Scorer]: ...


@dataclass(frozen=True)
class LinearScorer:
    mean: np.ndarray
    scale: np.ndarray
    weight: np.ndarray
    bias: float

    def decision(self, x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, dtype=np.float64) - self.mean) / self.scale) @ self.weight + self.bias


def _lr_path(xs: np.ndarray, ys: Sequence[np.ndarray], cs: Sequence[float]) -> list[tuple[np.ndarray, float]]:
    """(weight, bias) of an L2 logistic regression (unpenalised bias) for each C, on rows stacked once per
    label set. With more features than rows the fit runs in the rows' span (an exact rotation: the L2 optimum
    lies there), so wide concatenations of layers cost no more than the number of questions."""
    basis = None
    if xs.shape[1] > xs.shape[0]:
        _, s, vt = np.linalg.svd(xs, full_matrices=False)
        keep = s > s[0] * 1e-10
        basis = vt[keep].T  # (d, r)
        xs = xs @ basis
    x_all = np.vstack([xs] * len(ys)) if len(ys) > 1 else xs
    y_all = np.concatenate(ys)
    lr = LogisticRegression(C=cs[0], max_iter=1000, warm_start=True, solver="newton-cholesky")
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for c in cs:
            lr.set_params(C=c).fit(x_all, y_all)
            w = lr.coef_[0].astype(np.float64)
            out.append(((basis @ w) if basis is not None else w.copy(), float(lr.intercept_[0])))
    return out


class StandardisedLogistic:
    """StandardScaler then logistic regression: the gateway's probe."""

    def fit_path(self, x: np.ndarray, ys: Sequence[np.ndarray], cs: Sequence[float]) -> list[Scorer]:
        x = np.asarray(x, dtype=np.float64)
        scaler = StandardScaler().fit(x)
        mean, scale = scaler.mean_.astype(np.float64), scaler.scale_.astype(np.float64)
        xs = (x - mean) / scale
        return [LinearScorer(mean, scale, w, b) for w, b in _lr_path(xs, ys, cs)]


@dataclass(frozen=True)
class _TfidfScorer:
    vectorizer: TfidfVectorizer
    weight: np.ndarray
    bias: float

    def decision(self, x: Sequence[str]) -> np.ndarray:
        return np.asarray(self.vectorizer.transform(list(x)) @ self.weight).ravel() + self.bias


class TfidfLogistic:
    """Word 1–2-gram TF-IDF of the question text, then logistic regression (a text baseline)."""

    def fit_path(self, x: Sequence[str], ys: Sequence[np.ndarray], cs: Sequence[float]) -> list[Scorer]:
        vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
        m = vectorizer.fit_transform(list(x))
        from scipy.sparse import vstack

        m_all = vstack([m] * len(ys)) if len(ys) > 1 else m
        y_all = np.concatenate(ys)
        lr = LogisticRegression(C=cs[0], max_iter=5000, warm_start=True)
        out: list[Scorer] = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            for c in cs:
                lr.set_params(C=c).fit(m_all, y_all)
                out.append(_TfidfScorer(vectorizer, lr.coef_[0].copy(), float(lr.intercept_[0])))
        return out


def _take(x: Any, idx: np.ndarray) -> Any:
    return x[idx] if isinstance(x, np.ndarray) else [x[i] for i in idx]


def _safe_auc(y: np.ndarray, s: np.ndarray) -> float:
    return float(roc_auc_score(y, s)) if len(np.unique(y)) > 1 else 0.5


@dataclass(frozen=True)
class InnerResult:
    c: float
    oof_logits: np.ndarray  # out-of-fold logits at the chosen C
    mean_auroc: dict[float, float]  # mean inner AUROC (against the target labels) of each C

    @property
    def best_auroc(self) -> float:
        return self.mean_auroc[self.c]


def inner_cv(
    x: Any, ys: Sequence[np.ndarray], target: np.ndarray, *, cs: Sequence[float] = DEFAULT_CS, folds: int = 5,
    seed: int = 0, model: Model | None = None,
) -> InnerResult:
    """Stratified K-fold over rows: the C with the best mean AUROC against ``target``, and its OOF logits."""
    model = model or StandardisedLogistic()
    cs = sorted(cs)
    n = len(target)
    oof = np.zeros((len(cs), n))
    aucs = np.zeros((len(cs), folds))
    split = StratifiedKFold(folds, shuffle=True, random_state=seed).split(np.zeros(n), target)
    for f, (tr, te) in enumerate(split):
        path = model.fit_path(_take(x, tr), [y[tr] for y in ys], cs)
        x_te = _take(x, te)
        for j, scorer in enumerate(path):
            oof[j, te] = scorer.decision(x_te)
            aucs[j, f] = _safe_auc(target[te], oof[j, te])
    means = aucs.mean(axis=1)
    best = int(np.argmax(means))  # first (smallest C) among equals: the stronger regularisation
    return InnerResult(float(cs[best]), oof[best], {float(c): float(m) for c, m in zip(cs, means, strict=True)})


def choose_c(x: np.ndarray, y: np.ndarray, cs: Sequence[float], folds: int, seed: int) -> float:
    """The C with the best mean AUROC over an inner stratified K-fold split of (x, y)."""
    return inner_cv(x, [y], y, cs=cs, folds=folds, seed=seed).c


def fit_platt(scores: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(a, b) so that sigmoid(a·z + b) is calibrated on held-out logits z."""
    lr = LogisticRegression(C=1e6, max_iter=1000).fit(np.asarray(scores).reshape(-1, 1), y)
    return float(lr.coef_[0, 0]), float(lr.intercept_[0])


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, dtype=np.float64)))


@dataclass(frozen=True)
class NestedResult:
    probability: np.ndarray  # calibrated, each row from a model (C, weights and Platt) that never saw it
    logits: np.ndarray
    chosen: list[Any]  # what the inner CV chose in each outer fold


def nested_oof(
    x: Any, ys: Sequence[np.ndarray], target: np.ndarray, *, cs: Sequence[float] = DEFAULT_CS, folds: int = 5,
    seed: int = 0, model: Model | None = None,
) -> NestedResult:
    """Honest out-of-fold estimates: in each outer fold, C by inner CV on the training part, Platt on the
    inner out-of-fold logits, weights on the whole training part; then the held-out part is scored."""
    model = model or StandardisedLogistic()
    n = len(target)
    prob, logits, chosen = np.zeros(n), np.zeros(n), []
    outer = StratifiedKFold(folds, shuffle=True, random_state=seed).split(np.zeros(n), target)
    for tr, te in outer:
        x_tr = _take(x, tr)
        inner = inner_cv(x_tr, [y[tr] for y in ys], target[tr], cs=cs, folds=folds, seed=seed, model=model)
        a, b = fit_platt(inner.oof_logits, target[tr])
        scorer = model.fit_path(x_tr, [y[tr] for y in ys], [inner.c])[0]
        logits[te] = scorer.decision(_take(x, te))
        prob[te] = sigmoid(a * logits[te] + b)
        chosen.append(inner.c)
    return NestedResult(prob, logits, chosen)


def out_of_fold_scores(
    x: np.ndarray, y: np.ndarray, cs: Sequence[float], folds: int, seed: int
) -> tuple[np.ndarray, list[float]]:
    """Logits for every row from a model that never saw it; C re-chosen inside each outer fold (nested CV)."""
    result = nested_oof(x, [y], y, cs=cs, folds=folds, seed=seed)
    return result.logits, result.chosen


@dataclass(frozen=True)
class FittedProbe:
    probe: Probe
    oof_probability: np.ndarray  # calibrated nested out-of-fold estimates, one per training row
    c: float
    oof_auroc: float  # of the nested out-of-fold estimates, against the target labels


def fit_probe(
    x: np.ndarray, y: np.ndarray, *, cs: Sequence[float] = DEFAULT_CS, folds: int = 5, seed: int = 0,
    train_labels: Sequence[np.ndarray] | None = None,
) -> FittedProbe:
    """A calibrated probe fitted on all of (x, y), with honest (nested) out-of-fold estimates beside it.

    ``y`` is the backend's own labels (C choice, Platt, metrics); ``train_labels`` the label sets whose
    stacked rows train the weights (default: ``[y]``)."""
    ys = list(train_labels) if train_labels is not None else [y]
    for labels in [y, *ys]:
        if len(np.unique(labels)) < 2:
            raise ValueError("labels must contain both successes and failures")
    nested = nested_oof(x, ys, y, cs=cs, folds=folds, seed=seed)
    inner = inner_cv(x, ys, y, cs=cs, folds=folds, seed=seed)
    a, b = fit_platt(inner.oof_logits, y)
    scorer = StandardisedLogistic().fit_path(x, ys, [inner.c])[0]
    assert isinstance(scorer, LinearScorer)
    probe = Probe(mean=scorer.mean, scale=scorer.scale, weight=scorer.weight, bias=scorer.bias, platt_a=a,
                  platt_b=b)
    return FittedProbe(probe, nested.probability, inner.c, float(roc_auc_score(y, nested.probability)))
