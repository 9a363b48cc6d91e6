"""The learner's small fits and measures, in numpy alone (the gateway image has no scikit-learn or scipy).

- ``fit_logistic``: weighted logistic regression by Newton's method with an L2 pull toward prior weights,
  ``Σ wᵢ·loss(yᵢ, xᵢ·θ + offsetᵢ) + λ/2·Σⱼ mⱼ(θⱼ − θ⁰ⱼ)²``: with no data it returns the prior, with much data
  the unregularised fit. Labels may be graded (a score in [0, 1] counts as that much of a success).
- ``fit_platt``: the two numbers (a, b) of Platt's calibration, weighted.
- ``log_loss``, ``auroc``, ``ece``: weighted where the learner needs weights (inverse propensity).

The learner's problems are small (a few thousand rows, a few hundred columns): a Newton step solves one
d × d system, and converges in a handful of steps from the prior.
"""

from __future__ import annotations

import numpy as np

EPS = 1e-12


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, dtype=np.float64)))


def _weights(w: np.ndarray | None, n: int) -> np.ndarray:
    return np.ones(n) if w is None else np.asarray(w, dtype=np.float64)


def log_loss(y: np.ndarray, p: np.ndarray, w: np.ndarray | None = None) -> float:
    """Weighted mean cross-entropy of probabilities ``p`` against labels ``y`` in [0, 1]."""
    y = np.asarray(y, dtype=np.float64)
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    w = _weights(w, len(y))
    return float(np.sum(w * -(y * np.log(p) + (1 - y) * np.log(1 - p))) / max(np.sum(w), EPS))


def auroc(y: np.ndarray, s: np.ndarray, w: np.ndarray | None = None) -> float:
    """Weighted area under the ROC curve: the weighted chance that a success scores above a failure (ties count
    a half). A graded label y counts as y of a success and 1 − y of a failure. NaN without both."""
    y = np.asarray(y, dtype=np.float64)
    s = np.asarray(s, dtype=np.float64)
    w = _weights(w, len(y))
    pos, neg = w * y, w * (1 - y)
    total_pos, total_neg = pos.sum(), neg.sum()
    if total_pos <= 0 or total_neg <= 0:
        return float("nan")
    order = np.argsort(s, kind="stable")
    s, pos, neg = s[order], pos[order], neg[order]
    starts = np.concatenate([[0], np.flatnonzero(np.diff(s) > 0) + 1])
    pos_g = np.add.reduceat(pos, starts)
    neg_g = np.add.reduceat(neg, starts)
    below = np.concatenate([[0.0], np.cumsum(neg_g)[:-1]])
    return float(np.sum(pos_g * (below + 0.5 * neg_g)) / (total_pos * total_neg))


def ece(y: np.ndarray, p: np.ndarray, bins: int = 10, w: np.ndarray | None = None) -> float:
    """Expected calibration error over ``bins`` equal-width bins of p (probes.metrics.ece's definition, weighted)."""
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    w = _weights(w, len(y))
    which = np.minimum((p * bins).astype(np.int64), bins - 1)
    total = float(w.sum())
    if total <= 0:
        return float("nan")
    out = 0.0
    for b in range(bins):
        m = which == b
        wb = w[m].sum()
        if wb > 0:
            out += wb / total * abs(np.sum(w[m] * p[m]) / wb - np.sum(w[m] * y[m]) / wb)
    return float(out)


def fit_logistic(
    x: np.ndarray, y: np.ndarray, w: np.ndarray | None = None, *, prior: np.ndarray | None = None, lam: float = 0.0,
    penalised: np.ndarray | None = None, offset: np.ndarray | None = None, init: np.ndarray | None = None,
    max_iter: int = 100, tol: float = 1e-9,
) -> np.ndarray:
    """θ minimising ``Σ wᵢ·ℓ(yᵢ, xᵢ·θ + offsetᵢ) + λ/2·Σⱼ penalisedⱼ·(θⱼ − priorⱼ)²`` (ℓ: logistic loss).

    ``penalised`` (default: every column) marks the columns pulled toward ``prior`` (default zeros); an intercept
    column is usually left free. Newton's method with step halving, from ``init`` (default: the prior). A column
    neither penalised nor informed by data (e.g. all rows zero) stays at its start."""
    x = np.asarray(x, dtype=np.float64)
    n, d = x.shape
    y = np.asarray(y, dtype=np.float64)
    w = _weights(w, n)
    prior = np.zeros(d) if prior is None else np.asarray(prior, dtype=np.float64)
    m = np.ones(d) if penalised is None else np.asarray(penalised, dtype=np.float64)
    off = np.zeros(n) if offset is None else np.asarray(offset, dtype=np.float64)
    pulled = m > 0
    if lam > 0 and 0 < n < int(pulled.sum()) and np.all((m == 0) | (m == 1)):
        return _fit_in_row_span(x, y, w, prior, lam, pulled, off, init, max_iter, tol)
    theta = prior.copy() if init is None else np.asarray(init, dtype=np.float64).copy()
    ridge = lam * m + 1e-10  # a whisper of ridge keeps the system solvable where a column carries nothing

    def objective(t: np.ndarray) -> float:
        eta = x @ t + off
        # log(1 + e^η) − yη, stably
        loss = np.logaddexp(0.0, eta) - y * eta
        return float(np.sum(w * loss) + 0.5 * lam * np.sum(m * (t - prior) ** 2))

    current = objective(theta)
    for _ in range(max_iter):
        p = sigmoid(x @ theta + off)
        grad = x.T @ (w * (p - y)) + lam * m * (theta - prior)
        if np.max(np.abs(grad)) < tol * max(1.0, float(np.sum(w))):
            break
        h = (x * (w * p * (1 - p))[:, None]).T @ x
        h[np.diag_indices(d)] += ridge
        try:
            step = np.linalg.solve(h, grad)
        except np.linalg.LinAlgError:
            step = np.linalg.lstsq(h, grad, rcond=None)[0]
        t = 1.0
        while t > 1e-6:
            candidate = theta - t * step
            value = objective(candidate)
            if value <= current + 1e-12:
                break
            t *= 0.5
        else:
            break
        improvement = current - value
        theta, current = candidate, value
        if improvement < 1e-12 * max(1.0, abs(current)):
            break
    return theta


def fit_platt(z: np.ndarray, y: np.ndarray, w: np.ndarray | None = None, *, prior: tuple[float, float] = (1.0, 0.0),
              lam: float = 1e-3) -> tuple[float, float]:
    """(a, b) such that sigmoid(a·z + b) is calibrated on logits ``z`` and labels ``y`` (weighted), pulled very
    lightly toward ``prior`` so that separable or one-sided data still gives finite numbers."""
    z = np.asarray(z, dtype=np.float64)
    design = np.column_stack([z, np.ones_like(z)])
    a, b = fit_logistic(design, y, w, prior=np.array(prior, dtype=np.float64), lam=lam)
    return float(a), float(b)


def _fit_in_row_span(x: np.ndarray, y: np.ndarray, w: np.ndarray, prior: np.ndarray, lam: float, pulled: np.ndarray,
                     off: np.ndarray, init: np.ndarray | None, max_iter: int, tol: float) -> np.ndarray:
    """The same optimum with fewer rows than pulled columns: the pulled coefficients move from the prior only
    within the span of the rows (any other direction adds penalty and no fit), so the problem is solved in that
    span's coordinates (a thin SVD: an exact rotation) and rotated back. Each Newton step then costs rows³, not
    columns³."""
    xp, xf = x[:, pulled], x[:, ~pulled]
    u, s, vt = np.linalg.svd(xp, full_matrices=False)
    keep = s > (s[0] if len(s) else 0.0) * 1e-10
    u, s, vt = u[:, keep], s[keep], vt[keep]
    r = int(keep.sum())
    design = np.hstack([u * s, xf])
    prior2 = np.concatenate([np.zeros(r), prior[~pulled]])
    mask2 = np.concatenate([np.ones(r), np.zeros(int((~pulled).sum()))])
    init2 = None
    if init is not None:
        init = np.asarray(init, dtype=np.float64)
        init2 = np.concatenate([vt @ (init[pulled] - prior[pulled]), init[~pulled]])
    sol = fit_logistic(design, y, w, prior=prior2, lam=lam, penalised=mask2, offset=off + xp @ prior[pulled],
                       init=init2, max_iter=max_iter, tol=tol)
    theta = prior.copy()
    theta[pulled] = prior[pulled] + vt.T @ sol[:r]
    theta[~pulled] = sol[r:]
    return theta
