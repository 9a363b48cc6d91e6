"""Fitting one probe: standardised L2 logistic regression, C chosen by inner cross-validation, Platt on
out-of-fold scores. Everything is seeded; the same inputs give the same probe.

A probe may be trained on several label sets at once (``ys``: the rows are stacked once per set, e.g. a dear
backend's probe learning from the cheap backend's more numerous failures as well as its own), while C is
chosen, Platt is fitted and AUROC is measured against one ``target`` label set: the backend's own.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sklearn.preprocessing import StandardScaler

from router import TOKEN_PATTERN, Probe, TextFeatures

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

    def probe(self) -> Probe:
        return Probe(mean=self.mean, scale=self.scale, weight=self.weight, bias=self.bias)


def _lr_path(xs: np.ndarray, ys: Sequence[np.ndarray], cs: Sequence[float]) -> list[tuple[np.ndarray, float]]:
    """(weight, bias) of an L2 logistic regression (unpenalised bias) for each C, on the label sets stacked
    (as weights, ``stack_as_weights``). With more features than rows the fit runs in the rows' span (an exact
    rotation: the L2 optimum lies there), so wide concatenations of layers cost no more than the number of
    questions."""
    basis = None
    if xs.shape[1] > xs.shape[0]:
        _, s, vt = np.linalg.svd(xs, full_matrices=False)
        keep = s > s[0] * 1e-10
        basis = vt[keep].T  # (d, r)
        xs = xs @ basis
    rows, y_all, w_all = stack_as_weights(ys)
    x_all = xs[rows]
    lr = LogisticRegression(C=cs[0], max_iter=1000, warm_start=True, solver="newton-cholesky")
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for c in cs:
            lr.set_params(C=c).fit(x_all, y_all, sample_weight=w_all)
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
        rows, y_all, w_all = stack_as_weights(ys)
        m_all = m[rows]
        lr = LogisticRegression(C=cs[0], max_iter=5000, warm_start=True)
        out: list[Scorer] = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            for c in cs:
                lr.set_params(C=c).fit(m_all, y_all, sample_weight=w_all)
                out.append(_TfidfScorer(vectorizer, lr.coef_[0].copy(), float(lr.intercept_[0])))
        return out


@dataclass(frozen=True)
class Inputs:
    """What a probe reading several feature sources is trained on: scorer activations and prompt texts."""

    activations: np.ndarray
    texts: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, idx: np.ndarray) -> Inputs:
        return Inputs(self.activations[idx], tuple(self.texts[i] for i in idx))


def fit_text_features(texts: Sequence[str], *, length: bool = True, ngram_max: int = 2, min_df: int = 2,
                      max_features: int | None = 20000) -> TextFeatures:
    """Vocabulary and idf of ``texts`` (scikit-learn's TfidfVectorizer, the recipe ``TextFeatures`` applies)."""
    vectorizer = TfidfVectorizer(ngram_range=(1, ngram_max), min_df=min_df, max_features=max_features,
                                 sublinear_tf=True, token_pattern=TOKEN_PATTERN, lowercase=True)
    vectorizer.fit(list(texts))
    order = sorted(vectorizer.vocabulary_.items(), key=lambda kv: kv[1])
    return TextFeatures(tuple(t for t, _ in order), vectorizer.idf_.astype(np.float64), ngram_max=ngram_max,
                        length=length)


@dataclass(frozen=True)
class JointScorer:
    """z = (([activations ‖ text features]) − mean) / scale · weight + bias, the text part kept sparse."""

    text: TextFeatures
    mean: np.ndarray
    scale: np.ndarray
    weight: np.ndarray
    bias: float

    def decision(self, x: Inputs) -> np.ndarray:
        w = self.weight / self.scale
        d = x.activations.shape[1]
        return (np.asarray(x.activations, dtype=np.float64) @ w[:d] + np.asarray(self.text.sparse(x.texts) @ w[d:])
                + self.bias - float(self.mean @ w))

    def probe(self) -> Probe:
        return Probe(mean=self.mean, scale=self.scale, weight=self.weight, bias=self.bias, text=self.text)


def stack_as_weights(ys: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows stacked once per label set, as (row index, label, weight): each row at most twice, with weights
    counting its successes and failures, the same objective as stacking the rows ``len(ys)`` times. A graded
    label set (a success rate in [0, 1], ``Dataset.training_labels``) counts as that fraction of a success and
    the rest of a failure."""
    pos = np.sum(ys, axis=0).astype(np.float64)
    neg = len(ys) - pos
    n = len(pos)
    rows = np.concatenate([np.arange(n), np.arange(n)])
    labels = np.concatenate([np.ones(n, dtype=np.int64), np.zeros(n, dtype=np.int64)])
    weights = np.concatenate([pos, neg])
    keep = weights > 0
    return rows[keep], labels[keep], weights[keep]


class SparseLogistic:
    """L2 logistic regression on sparse rows as they are (TF-IDF), label sets stacked as weights."""

    def fit_path(self, x: Any, ys: Sequence[np.ndarray], cs: Sequence[float]) -> list[Scorer]:
        rows, y_all, w_all = stack_as_weights(ys)
        m = x[rows]
        lr = LogisticRegression(C=cs[0], max_iter=5000, warm_start=True, solver="liblinear", intercept_scaling=100.0)
        out: list[Scorer] = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            for c in cs:
                lr.set_params(C=c).fit(m, y_all, sample_weight=w_all)
                out.append(_SparseScorer(lr.coef_[0].astype(np.float64), float(lr.intercept_[0])))
        return out


@dataclass(frozen=True)
class _SparseScorer:
    weight: np.ndarray
    bias: float

    def decision(self, x: Any) -> np.ndarray:
        return np.asarray(x @ self.weight).ravel() + self.bias


class Stacked:
    """Activations and text features in one linear model, fitted by stacking: an activation probe (C by inner
    CV) and a TF-IDF probe (C by inner CV) give out-of-fold logits, a small logistic regression on [both logits,
    standardised log length] weighs them, the three fold into one weight vector over [activations ‖ TF-IDF ‖ log
    length], and Platt on the combination's out-of-fold output calibrates it against the backend's own labels.
    The TF-IDF vocabulary and idf come from the training texts alone (no labels)."""

    def __init__(self, *, length: bool = True, cs: Sequence[float] = DEFAULT_CS,
                 text_cs: Sequence[float] = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0), max_features: int | None = 20000) -> None:
        self.length = length
        self.cs = tuple(cs)
        self.text_cs = tuple(text_cs)
        self.max_features = max_features

    def fit_calibrated(self, x: Inputs, ys: Sequence[np.ndarray], target: np.ndarray, *, folds: int,
                       seed: int) -> Calibrated:
        text = fit_text_features(x.texts, length=self.length, max_features=self.max_features)
        t = text.sparse(x.texts)
        vocab = len(text.vocabulary)
        inner_act = inner_cv(x.activations, ys, target, cs=self.cs, folds=folds, seed=seed)
        inner_txt = inner_cv(t[:, :vocab], ys, target, cs=self.text_cs, folds=folds, seed=seed,
                             model=SparseLogistic())
        columns = [inner_act.oof_logits, inner_txt.oof_logits]
        l_mean, l_scale = 0.0, 1.0
        if self.length:
            length = t[:, vocab].toarray().ravel()
            l_mean, l_scale = float(length.mean()), float(length.std())
            l_scale = l_scale if l_scale > 1e-6 else 1.0  # all prompts of one length: a constant column
            columns.append((length - l_mean) / l_scale)
        # The combination is part of the weights: learnt from the training label sets (stacked as weights);
        # Platt on its out-of-fold output then calibrates against the backend's own labels.
        z = np.column_stack(columns)
        rows, y_all, w_all = stack_as_weights(ys)
        combiner = LogisticRegression(C=1e4, max_iter=1000).fit(z[rows], y_all, sample_weight=w_all)
        k = combiner.coef_[0]
        a, b = fit_platt(z @ k + combiner.intercept_[0], target)
        act = StandardisedLogistic().fit_path(x.activations, ys, [inner_act.c])[0]
        txt = SparseLogistic().fit_path(t[:, :vocab], ys, [inner_txt.c])[0]
        assert isinstance(act, LinearScorer) and isinstance(txt, _SparseScorer)
        weight = np.concatenate([k[0] * act.weight, k[1] * txt.weight, [k[2]] if self.length else []])
        mean = np.concatenate([act.mean, np.zeros(vocab), [l_mean] if self.length else []])
        scale = np.concatenate([act.scale, np.ones(vocab), [l_scale] if self.length else []])
        bias = float(k[0] * act.bias + k[1] * txt.bias + combiner.intercept_[0])
        scorer = JointScorer(text, mean, scale, weight, bias)
        inner = InnerResult((inner_act.c, inner_txt.c), z @ k + combiner.intercept_[0], {})  # the combination's
        return Calibrated(scorer, a, b, (inner_act.c, inner_txt.c, *(round(float(v), 4) for v in k)), inner)


@dataclass(frozen=True)
class TextScorer:
    """z = [TF-IDF ‖ log(1 + words)] · weight + bias: a model of the prompt's text alone."""

    text: TextFeatures
    weight: np.ndarray
    bias: float

    def decision(self, x: Inputs | Sequence[str]) -> np.ndarray:
        texts = x.texts if isinstance(x, Inputs) else x
        return np.asarray(self.text.sparse(list(texts)) @ self.weight).ravel() + self.bias

    def probe(self) -> Probe:
        n = len(self.weight)
        return Probe(mean=np.zeros(n), scale=np.ones(n), weight=self.weight, bias=self.bias, text=self.text)


class TextOnly:
    """The prompt's text features alone (``router.text_features``: TF-IDF of word 1–2-grams ‖ log(1 + words)),
    L2 logistic regression on them as they are, C by inner CV, Platt on its out-of-fold logits: a cascade's first
    stage, which the gateway computes in microseconds without a scorer pass. It reads ``Inputs`` (their texts) or
    the texts themselves; the vocabulary and idf come from the training texts (no labels), so every backend's
    model trained on the same rows shares them with each other and with ``Stacked`` probes."""

    def __init__(self, *, length: bool = True, text_cs: Sequence[float] = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0),
                 max_features: int | None = 20000) -> None:
        self.length = length
        self.text_cs = tuple(text_cs)
        self.max_features = max_features

    def fit_calibrated(self, x: Inputs | Sequence[str], ys: Sequence[np.ndarray], target: np.ndarray, *,
                       folds: int, seed: int) -> Calibrated:
        texts = list(x.texts if isinstance(x, Inputs) else x)
        text = fit_text_features(texts, length=self.length, max_features=self.max_features)
        m = text.sparse(texts)
        inner = inner_cv(m, ys, target, cs=self.text_cs, folds=folds, seed=seed, model=SparseLogistic())
        a, b = fit_platt(inner.oof_logits, target)
        fitted = SparseLogistic().fit_path(m, ys, [inner.c])[0]
        assert isinstance(fitted, _SparseScorer)
        return Calibrated(TextScorer(text, fitted.weight, fitted.bias), a, b, inner.c, inner)


def _take(x: Any, idx: np.ndarray) -> Any:
    if isinstance(x, np.ndarray) or hasattr(x, "tocsr"):
        return x[idx]
    return x.take(idx) if isinstance(x, Inputs) else [x[i] for i in idx]


def _safe_auc(y: np.ndarray, s: np.ndarray) -> float:
    return float(roc_auc_score(y, s)) if len(np.unique(y)) > 1 else 0.5


@dataclass(frozen=True)
class InnerResult:
    c: Any  # the chosen grid point: C, or (α, C) for a joint model
    oof_logits: np.ndarray  # out-of-fold logits at the chosen C
    mean_auroc: dict[Any, float]  # mean inner AUROC (against the target labels) of each grid point

    @property
    def best_auroc(self) -> float:
        return self.mean_auroc[self.c]


def inner_cv(
    x: Any, ys: Sequence[np.ndarray], target: np.ndarray, *, cs: Sequence[float] = DEFAULT_CS, folds: int = 5,
    seed: int = 0, model: Model | None = None,
) -> InnerResult:
    """Stratified K-fold over rows: the C with the best mean AUROC against ``target``, and its OOF logits."""
    model = model or StandardisedLogistic()
    cs = sorted(_point(c) for c in cs)
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
    return InnerResult(_point(cs[best]), oof[best], {_point(c): float(m) for c, m in zip(cs, means, strict=True)})


def _point(c: Any) -> Any:
    return tuple(float(v) for v in c) if isinstance(c, tuple | list) else float(c)


def fit_platt(scores: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(a, b) so that sigmoid(a·z + b) is calibrated on held-out logits z."""
    lr = LogisticRegression(C=1e6, max_iter=1000).fit(np.asarray(scores).reshape(-1, 1), y)
    return float(lr.coef_[0, 0]), float(lr.intercept_[0])


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, dtype=np.float64)))


@dataclass(frozen=True)
class Calibrated:
    """A scorer fitted on all its training rows, its Platt (a, b) from inner out-of-fold logits, its C."""

    scorer: Scorer
    a: float
    b: float
    c: Any
    inner: InnerResult

    def probability(self, x: Any) -> np.ndarray:
        return sigmoid(self.a * self.scorer.decision(x) + self.b)

    @property
    def inner_probability(self) -> np.ndarray:
        """Calibrated estimates of the training rows from the inner cross-validation's held-out models (at the
        chosen C): what the cascade's margins are chosen on."""
        return sigmoid(self.a * self.inner.oof_logits + self.b)


def fit_calibrated(
    x: Any, ys: Sequence[np.ndarray], target: np.ndarray, *, cs: Sequence[Any] = DEFAULT_CS, folds: int = 5,
    seed: int = 0, model: Model | Stacked | TextOnly | None = None,
) -> Calibrated:
    """C by inner CV, Platt on the inner out-of-fold logits at that C, weights on all of ``x``."""
    if isinstance(model, Stacked | TextOnly):
        return model.fit_calibrated(x, ys, target, folds=folds, seed=seed)
    model = model or StandardisedLogistic()
    inner = inner_cv(x, ys, target, cs=cs, folds=folds, seed=seed, model=model)
    a, b = fit_platt(inner.oof_logits, target)
    return Calibrated(model.fit_path(x, ys, [inner.c])[0], a, b, inner.c, inner)


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
        fitted = fit_calibrated(_take(x, tr), [y[tr] for y in ys], target[tr], cs=cs, folds=folds, seed=seed,
                                model=model)
        logits[te] = fitted.scorer.decision(_take(x, te))
        prob[te] = sigmoid(fitted.a * logits[te] + fitted.b)
        chosen.append(fitted.c)
    return NestedResult(prob, logits, chosen)


@dataclass(frozen=True)
class FittedProbe:
    probe: Probe
    oof_probability: np.ndarray  # calibrated nested out-of-fold estimates, one per training row
    c: float
    oof_auroc: float  # of the nested out-of-fold estimates, against the target labels
    inner_probability: np.ndarray  # the final fit's inner out-of-fold estimates (``Calibrated.inner_probability``)


def fit_probe(
    x: Any, y: np.ndarray, *, cs: Sequence[Any] = DEFAULT_CS, folds: int = 5, seed: int = 0,
    train_labels: Sequence[np.ndarray] | None = None, model: Model | None = None,
) -> FittedProbe:
    """A calibrated probe fitted on all of (x, y), with honest (nested) out-of-fold estimates beside it.

    ``y`` is the backend's own labels (C choice, Platt, metrics); ``train_labels`` the label sets whose
    stacked rows train the weights (default: ``[y]``)."""
    ys = list(train_labels) if train_labels is not None else [y]
    for labels in [y, *ys]:
        if len(np.unique(labels)) < 2:
            raise ValueError("labels must contain both successes and failures")
    nested = nested_oof(x, ys, y, cs=cs, folds=folds, seed=seed, model=model)
    fitted = fit_calibrated(x, ys, y, cs=cs, folds=folds, seed=seed, model=model)
    probe = replace(fitted.scorer.probe(), platt_a=fitted.a, platt_b=fitted.b)  # type: ignore[attr-defined]
    return FittedProbe(probe, nested.probability, fitted.c, float(roc_auc_score(y, nested.probability)),
                       fitted.inner_probability)


TEXT_SOURCES = ("none", "tfidf", "tfidf+length")


def probe_model(text: str = "none", cs: Sequence[Any] | None = None) -> tuple[Any, tuple[Any, ...]]:
    """The probe's model and its C grid for a choice of text features beside the activations."""
    if text not in TEXT_SOURCES:
        raise ValueError(f"text features must be one of {', '.join(TEXT_SOURCES)}, not {text!r}")
    grid = tuple(cs or DEFAULT_CS)
    if text == "none":
        return StandardisedLogistic(), grid
    return Stacked(length=text == "tfidf+length", cs=grid), grid


@dataclass(frozen=True)
class Estimates:
    name: str
    probability: np.ndarray
    chosen: list[Any] | None = None


def held_out(
    x: Any, ys: Sequence[np.ndarray], y: np.ndarray, *, x_test: Any = None, cs: Sequence[Any] = DEFAULT_CS,
    folds: int = 5, seed: int = 0, model: Any = None,
) -> Estimates:
    """Success estimates no model saw the labels of: nested out-of-fold on (x, y), or, with ``x_test``, a
    probe fitted on all of (x, y) (C and Platt by inner CV there) applied to ``x_test``."""
    if x_test is None:
        nested = nested_oof(x, ys, y, cs=cs, folds=folds, seed=seed, model=model)
        return Estimates("", nested.probability, nested.chosen)
    fitted = fit_calibrated(x, ys, y, cs=cs, folds=folds, seed=seed, model=model)
    return Estimates("", fitted.probability(x_test), [fitted.c])


def probe_logits(probe: Probe, x: Any) -> np.ndarray:
    """The probe's uncalibrated logits for inputs ``x`` (activations, or ``Inputs`` for a text-reading probe)."""
    if isinstance(x, Inputs):
        if probe.text is None:
            return probe.decision(x.activations)
        return probe.decision(np.hstack([x.activations, probe.text.dense(x.texts)]))
    return probe.decision(x)


def recalibrated(probe: Probe, logits: np.ndarray, y: np.ndarray) -> Probe:
    """The probe with Platt re-fitted on (its logits, labels) of other data; the weights unchanged."""
    if len(np.unique(y)) < 2:
        raise ValueError("calibration labels must contain both successes and failures")
    a, b = fit_platt(logits, y)
    return replace(probe, platt_a=a, platt_b=b)
