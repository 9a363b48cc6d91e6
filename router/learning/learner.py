"""The learner: from recent labelled examples to a candidate probe per backend, promoted only past a guard.

For one backend, ``Learner.refit`` reads the backend's most recent ratings from the store and:

1. keeps those of keys allowed to rate (``raters``), at most ``per_key_cap`` of each key (its newest), and those
   whose features the probe reads (same scorer fingerprint and width);
2. weighs each label by the inverse of the probability that its request went to this backend (``propensity``,
   clipped at ``max_weight``; normalised to mean 1): a rating only says whether the backend that answered was
   right, and the policy sends a backend the requests it expects that backend to get right, so unweighted labels
   describe the traffic the backend was sent, not the traffic it will be judged on;
3. splits off the guard slice: a fixed share of examples, drawn by a hash of their id, that no candidate is ever
   fitted on (an example stays on its side across refits and restarts);
4. fits candidates on the rest, each kind once per weighting of ``fit_weights``: with the weights of step 2 (the
   default) and, if asked, also unweighted, named ``KIND:unweighted`` (labels of the requests the policy already
   sends the backend dominate an unweighted fit, but a handful of explored labels counted ten times no longer
   swing it; every candidate is still judged by weighted losses, so the guard decides which serves all the
   traffic better; research/learning/README.md measures both on replays):
   - ``recalibrate``: Platt's (a, b) re-fitted on the serving probe's logits (weights unchanged);
   - ``refit``: the weights and bias re-fitted, pulled toward the anchor probe (the one the config shipped) by
     ``λ/2·‖θ − θ_anchor‖²`` in its standardised space, λ chosen by cross-validated log-loss on the training
     part (the grid includes λ = ∞: no change), then Platt on the out-of-fold logits; a probe that also reads
     text features keeps its text weights' direction and re-fits their scale (one number);
5. promotes the candidate with the lowest guard log-loss among those that beat the serving probe on the guard
   slice: log-loss lower by at least ``min_logloss_gain`` and by ``guard_z`` standard errors of the paired
   per-label difference (so that a small guard does not promote a candidate by chance), AUROC not lower by more
   than ``auroc_tolerance``,
   with at least ``guard_min_labels`` guard labels (both outcomes present) and ``min_labels`` training labels,
   from at least ``min_keys`` keys; and where the guard holds labels of several keys, the candidate must also
   win on the guard without each key in turn, so that no key alone can carry a promotion.

A backend the policy rarely chooses gathers too few ratings to be judged on its own (a cheap, weak model that a
utility policy picks now and then: exploration alone feeds it slowly). Left at its shipped calibration while the
others are recalibrated, its estimates would no longer be comparable with theirs, and a policy comparing them
would favour it. ``Learner.share_shift`` (candidate kind ``shared_shift``, off by default: not yet measured on a
replay) gives such a backend the shift of the calibrated logit that the other
backends' ratings show (one number, fitted on their training ratings and promoted only if it beats their shipped
calibration on their guard ratings, and does not worsen the backend's own few ratings).

Everything here blocks (numpy, SQLite, files): run it in its own process or thread, never on the event loop.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from router.config import LearningConfig
from router.learning.examples import LabelledExample, unit_hash
from router.learning.fitting import EPS, auroc, fit_logistic, fit_platt, log_loss, sigmoid
from router.learning.store import ExampleStore
from router.learning.versions import Registry
from router.probe import Probe

log = logging.getLogger(__name__)

DEFAULT_LAMBDAS: tuple[float, ...] = (3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0, 10000.0)
KINDS = ("recalibrate", "refit", "shared_shift")
DEFAULT_KINDS = ("recalibrate", "refit")
FIT_WEIGHTS = ("propensity", "none")
DEFAULT_FIT_WEIGHTS = ("propensity",)


@dataclass(frozen=True)
class LearnerSettings:
    window: int = 4000  # most recent ratings per backend a refit reads
    refit_every: int = 100  # new ratings of a backend that make it due for a refit (Learner.run_due)
    min_labels: int = 150  # training labels (after the guard split) a candidate needs
    guard_fraction: float = 0.25  # share of examples kept for the guard, never fitted on
    guard_min_labels: int = 50  # guard labels needed to decide (each outcome at least guard_min_labels // 10)
    per_key_cap: int = 2000  # most ratings of one key used in one refit (its newest)
    raters: tuple[str, ...] | None = None  # keys whose ratings may teach; None: every key
    min_keys: int = 1  # distinct rating keys needed before a promotion
    max_weight: float = 10.0  # inverse-propensity weights are clipped here
    lambdas: tuple[float, ...] = DEFAULT_LAMBDAS  # the L2 pull's strengths tried (per label, see fit_refit)
    folds: int = 3  # cross-validation folds to choose λ
    min_logloss_gain: float = 0.0  # guard: a candidate's log-loss must be lower than the serving one's by this
    guard_z: float = 1.0  # ...and by this many standard errors of the paired per-label difference
    auroc_tolerance: float = 0.0  # guard: a candidate's AUROC may be lower than the serving one's by at most this
    kinds: tuple[str, ...] = DEFAULT_KINDS  # which candidates to fit
    fit_weights: tuple[str, ...] = DEFAULT_FIT_WEIGHTS  # each kind fitted once per weighting named here

    @classmethod
    def from_config(cls, cfg: LearningConfig) -> LearnerSettings:
        return cls(window=cfg.window, refit_every=cfg.refit_every_labels, min_labels=cfg.min_labels,
                   guard_fraction=cfg.guard_fraction, guard_min_labels=cfg.guard_min_labels,
                   per_key_cap=cfg.per_key_cap,
                   raters=tuple(cfg.raters) if cfg.raters is not None else None, min_keys=cfg.min_keys,
                   max_weight=cfg.max_weight, lambdas=tuple(cfg.lambdas), folds=cfg.folds,
                   min_logloss_gain=cfg.min_logloss_gain, guard_z=cfg.guard_z, auroc_tolerance=cfg.auroc_tolerance,
                   kinds=tuple(cfg.candidates), fit_weights=tuple(cfg.fit_weights))

    def __post_init__(self) -> None:
        unknown = set(self.kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown candidate kinds {sorted(unknown)}; known: {', '.join(KINDS)}")
        if not self.fit_weights or set(self.fit_weights) - set(FIT_WEIGHTS):
            raise ValueError(f"fit_weights must name some of {', '.join(FIT_WEIGHTS)}")
        if not 0.0 < self.guard_fraction < 1.0:
            raise ValueError("guard_fraction must be in (0, 1)")


# -- what a probe reads of an example ----------------------------------------------------------------------------


@dataclass
class Batch:
    """Examples of one backend ready to fit on: labels, weights, keys, the guard mask, features."""

    examples: list[LabelledExample]
    y: np.ndarray
    w: np.ndarray  # inverse-propensity weights, clipped, mean 1
    keys: np.ndarray
    guard: np.ndarray  # bool
    x: np.ndarray  # (n, scorer features) float64
    texts: list[str | None]
    dropped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.examples)

    def take(self, mask: np.ndarray) -> Batch:
        idx = np.flatnonzero(mask)
        return Batch([self.examples[i] for i in idx], self.y[idx], self.w[idx], self.keys[idx], self.guard[idx],
                     self.x[idx], [self.texts[i] for i in idx], self.dropped)


def select(examples: Sequence[LabelledExample], probe: Probe, settings: LearnerSettings) -> Batch:
    """The examples a refit of ``probe`` may learn from, with their weights and guard mask (see the module doc)."""
    dropped: dict[str, int] = defaultdict(int)
    fingerprint = probe.scorer.get("fingerprint")
    width = probe.weight.shape[0] - probe.text_dim
    kept: list[LabelledExample] = []
    for e in examples:
        o = e.observation
        if settings.raters is not None and o.key not in settings.raters:
            dropped["not_a_rater"] += 1
        elif fingerprint is not None and o.fingerprint != fingerprint:
            dropped["other_scorer"] += 1
        elif len(o.features) // 2 != width:
            dropped["other_width"] += 1
        elif probe.text is not None and o.text is None:
            dropped["no_text"] += 1
        else:
            kept.append(e)
    # The newest per_key_cap of each key.
    by_key: dict[str, list[int]] = defaultdict(list)
    for i, e in enumerate(kept):
        by_key[e.key].append(i)
    allowed = set()
    for idx in by_key.values():
        idx.sort(key=lambda i: (kept[i].rated_at, kept[i].id))
        allowed.update(idx[-settings.per_key_cap:])
        if len(idx) > settings.per_key_cap:
            dropped["over_key_cap"] += len(idx) - settings.per_key_cap
    kept = [e for i, e in enumerate(kept) if i in allowed]
    n = len(kept)
    y = np.array([e.label for e in kept], dtype=np.float64)
    w = np.minimum(1.0 / np.array([e.observation.propensity for e in kept], dtype=np.float64),
                   settings.max_weight) if n else np.zeros(0)
    if n:
        w = w / w.mean()
    keys = np.array([e.key for e in kept], dtype=object)
    guard = np.array([unit_hash(e.id, "guard") < settings.guard_fraction for e in kept], dtype=bool)
    x = (np.stack([e.observation.vector for e in kept]).astype(np.float64) if n
         else np.zeros((0, width), dtype=np.float64))
    return Batch(kept, y, w, keys, guard, x, [e.observation.text for e in kept], dict(dropped))


class Columns:
    """A probe lineage's view of a batch: activations standardised by the anchor's mean and scale, and the text
    features as sparse rows (computed once; every version of a lineage shares its text features)."""

    def __init__(self, anchor: Probe, batch: Batch) -> None:
        self.anchor = anchor
        self.d = anchor.weight.shape[0] - anchor.text_dim
        self.xs = (batch.x - anchor.mean[: self.d]) / anchor.scale[: self.d]
        self.rows = ([anchor.text.sparse_row(t or "") for t in batch.texts] if anchor.text is not None else None)

    def text_logit(self, probe: Probe, idx: np.ndarray | None = None) -> np.ndarray:
        """Σ over the text features of (t − mean) / scale · weight, for each row (zeros without text features)."""
        n = self.xs.shape[0] if idx is None else len(idx)
        if probe.text is None or self.rows is None:
            return np.zeros(n)
        d = self.d
        wt = probe.weight[d:] / probe.scale[d:]
        const = float(probe.mean[d:] @ wt)
        rows = self.rows if idx is None else [self.rows[i] for i in idx]
        return np.array([float(vals @ wt[cols]) for cols, vals in rows]) - const

    def logits(self, probe: Probe, idx: np.ndarray | None = None) -> np.ndarray:
        """The probe's uncalibrated logits z (what Probe.decision gives on [activations ‖ text features])."""
        x = self.xs if idx is None else self.xs[idx]
        d = self.d
        act = ((x * self.anchor.scale[:d] + self.anchor.mean[:d]) - probe.mean[:d]) / probe.scale[:d]
        return act @ probe.weight[:d] + self.text_logit(probe, idx) + probe.bias

    def probability(self, probe: Probe, idx: np.ndarray | None = None) -> np.ndarray:
        return probe.predict_logits(self.logits(probe, idx))


# -- candidates --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    kind: str
    probe: Probe
    details: dict[str, Any]


def fit_recalibration(serving: Probe, cols: Columns, idx: np.ndarray, y: np.ndarray, w: np.ndarray,
                      ids: Sequence[str], folds: int = 3, fit_w: np.ndarray | None = None) -> Candidate:
    """Platt re-fitted on the serving probe's logits (its weights unchanged): either only its intercept (a shift
    of the base rate) or both numbers, whichever has the lower cross-validated log-loss. The ratings of a backend
    cover mostly the requests the policy sends it, a narrow band of its logits, where the slope is poorly
    determined; a slope fitted there and applied to every request can be far off, a shift rarely is.

    ``fit_w`` (default ``w``) weighs the fits, ``w`` the cross-validated losses that choose between them: fits
    may use flattened weights while the choice is still judged on the traffic the backend will serve."""
    z = cols.logits(serving, idx)
    a0, b0 = serving.platt_a, serving.platt_b
    fold = np.array([int(unit_hash(i, "fold") * folds) for i in ids])
    fw = w if fit_w is None else fit_w

    def fit(kind: str, m: np.ndarray) -> tuple[float, float]:
        if kind == "platt":
            return fit_platt(z[m], y[m], fw[m], prior=(a0, b0))
        (b,) = fit_logistic(np.ones((int(m.sum()), 1)), y[m], fw[m], prior=np.array([b0]), lam=1e-3,
                            offset=a0 * z[m])
        return a0, float(b)

    losses = {}
    for kind in ("shift", "platt"):
        oof = np.zeros(len(z))
        for f in range(folds):
            te = fold == f
            if te.any():
                a, b = fit(kind, ~te) if (~te).any() else (a0, b0)
                oof[te] = a * z[te] + b
        losses[kind] = log_loss(y, sigmoid(oof), w)
    kind = min(losses, key=lambda k: losses[k])
    a, b = fit(kind, np.ones(len(z), dtype=bool))
    return Candidate("recalibrate", replace(serving, platt_a=a, platt_b=b),
                     {"platt": [round(a, 6), round(b, 6)], "platt_before": [a0, b0], "form": kind,
                      "cv_logloss": {k: round(v, 5) for k, v in losses.items()}})


def _design(cols: Columns, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[standardised activations ‖ the anchor's text logit ‖ 1], the prior θ in calibrated-logit space, and
    which columns are pulled toward it."""
    a = cols.anchor
    d = cols.d
    parts = [cols.xs[idx]]
    prior = [a.platt_a * a.weight[:d]]
    pulled = [np.ones(d)]
    if a.text is not None:
        parts.append(cols.text_logit(a, idx)[:, None])
        prior.append(np.array([a.platt_a]))
        pulled.append(np.ones(1))
    parts.append(np.ones((len(idx), 1)))
    prior.append(np.array([a.platt_a * a.bias + a.platt_b]))
    pulled.append(np.zeros(1))
    return np.hstack(parts), np.concatenate(prior), np.concatenate(pulled)


def _as_probe(anchor: Probe, theta: np.ndarray, d: int, platt: tuple[float, float]) -> Probe:
    weight = theta[:d]
    if anchor.text is not None:
        weight = np.concatenate([weight, theta[d] * anchor.weight[d:]])
    return replace(anchor, weight=weight, bias=float(theta[-1]), platt_a=platt[0], platt_b=platt[1])


def fit_refit(anchor: Probe, cols: Columns, idx: np.ndarray, y: np.ndarray, w: np.ndarray,
              ids: Sequence[str], settings: LearnerSettings, fit_w: np.ndarray | None = None) -> Candidate | None:
    """Weights re-fitted with an L2 pull toward ``anchor``, λ chosen by cross-validated weighted log-loss (λ is
    absolute, not per label: the more labels, the further the data may move the fit); None when no λ beats the
    anchor itself. ``fit_w`` (default ``w``) weighs the fits, ``w`` the cross-validated losses."""
    fw = w if fit_w is None else fit_w
    design, prior, pulled = _design(cols, idx)
    d = cols.d
    folds = np.array([int(unit_hash(i, "fold") * settings.folds) for i in ids])
    lambdas = sorted(settings.lambdas, reverse=True)  # strongest pull first: each fit starts from the last
    oof = np.zeros((len(lambdas) + 1, len(idx)))
    oof[0] = design @ prior  # λ = ∞: the anchor itself
    for f in range(settings.folds):
        tr, te = folds != f, folds == f
        if not te.any() or len(np.unique(y[tr] > 0.5)) < 2:
            oof[1:, te] = oof[0, te]
            continue
        theta = prior
        for j, lam in enumerate(lambdas, start=1):
            theta = fit_logistic(design[tr], y[tr], fw[tr], prior=prior, lam=lam, penalised=pulled, init=theta)
            oof[j, te] = design[te] @ theta
    losses = [log_loss(y, sigmoid(z), w) for z in oof]
    best = int(np.argmin(losses))
    details: dict[str, Any] = {"cv_logloss": {("inf" if j == 0 else f"{lambdas[j - 1]:g}"): round(v, 5)
                                              for j, v in enumerate(losses)}}
    if best == 0:
        return None
    lam = lambdas[best - 1]
    theta = fit_logistic(design, y, fw, prior=prior, lam=lam, penalised=pulled)
    a, b = fit_platt(oof[best], y, fw)  # calibrated on the out-of-fold logits at the chosen λ
    theta_prior_gap = float(np.linalg.norm((theta - prior)[pulled > 0]) / max(np.linalg.norm(prior[pulled > 0]),
                                                                              1e-12))
    details |= {"lambda": lam, "relative_change": round(theta_prior_gap, 5), "platt": [round(a, 6), round(b, 6)]}
    return Candidate("refit", _as_probe(anchor, theta, d, (a, b)), details)


# -- the guard ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    promote: bool
    reason: str
    serving: dict[str, float]
    candidate: dict[str, float]


def _scores(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> dict[str, float]:
    n_eff = float(np.sum(w) ** 2 / max(float(np.sum(w**2)), EPS))  # what the weights leave of the sample
    return {"logloss": round(log_loss(y, p, w), 6), "auroc": round(auroc(y, p, w), 6), "ece": round(ece(y, p, w), 6),
            "n": len(y), "n_effective": round(n_eff, 1)}


def ece(y: np.ndarray, p: np.ndarray, w: np.ndarray, bins: int = 10) -> float:
    """Weighted expected calibration error over ``bins`` equal-width bins of ``p``."""
    which = np.minimum((np.asarray(p) * bins).astype(int), bins - 1)
    total = float(np.sum(w))
    if total <= 0:
        return 0.0
    gap = 0.0
    for b in np.unique(which):
        m = which == b
        wb = float(np.sum(w[m]))
        gap += wb * abs(float(np.sum(w[m] * y[m]) / wb) - float(np.sum(w[m] * p[m]) / wb))
    return gap / total


def guard_verdict(y: np.ndarray, w: np.ndarray, keys: np.ndarray, p_serving: np.ndarray, p_candidate: np.ndarray,
                  settings: LearnerSettings) -> Verdict:
    """Whether the candidate beats the serving probe on guard labels (none of which it was fitted on)."""
    serving, candidate = _scores(y, p_serving, w), _scores(y, p_candidate, w)
    reason = _fails(y, w, p_serving, p_candidate, settings)
    if reason is None:
        distinct = sorted(set(keys.tolist()))
        if len(distinct) < settings.min_keys:
            reason = f"guard labels from {len(distinct)} keys, fewer than min_keys {settings.min_keys}"
        elif len(distinct) > 1:
            for k in distinct:
                rest = keys != k
                why = _fails(y[rest], w[rest], p_serving[rest], p_candidate[rest], settings)
                if why is not None:
                    reason = f"without key {k!r}'s labels: {why}"
                    break
    return Verdict(reason is None, reason or "beats the serving probe on the guard", serving, candidate)


def paired_gain(y: np.ndarray, p_serving: np.ndarray, p_candidate: np.ndarray,
                w: np.ndarray) -> tuple[float, float]:
    """The weighted mean of the per-label log-loss difference (serving − candidate) and its standard error."""
    p_s = np.clip(p_serving, 1e-7, 1 - 1e-7)
    p_c = np.clip(p_candidate, 1e-7, 1 - 1e-7)
    d = -(y * np.log(p_s) + (1 - y) * np.log(1 - p_s)) + (y * np.log(p_c) + (1 - y) * np.log(1 - p_c))
    total = float(np.sum(w))
    mean = float(np.sum(w * d) / total)
    se = float(np.sqrt(np.sum((w * (d - mean)) ** 2)) / total)
    return mean, se


def _fails(y: np.ndarray, w: np.ndarray, p_s: np.ndarray, p_c: np.ndarray, s: LearnerSettings) -> str | None:
    positives, negatives = float(np.sum(y > 0.5)), float(np.sum(y <= 0.5))
    each = max(1, s.guard_min_labels // 10)
    if len(y) < s.guard_min_labels or positives < each or negatives < each:
        return (f"{len(y)} guard labels ({int(positives)} right, {int(negatives)} wrong); needs "
                f"{s.guard_min_labels} with at least {each} of each")
    ll_s, ll_c = log_loss(y, p_s, w), log_loss(y, p_c, w)
    if not ll_c < ll_s - s.min_logloss_gain:
        return f"log-loss {ll_c:.4f} does not beat the serving {ll_s:.4f} by {s.min_logloss_gain:g}"
    gain, se = paired_gain(y, p_s, p_c, w)
    if gain <= s.guard_z * se:
        return (f"log-loss {ll_c:.4f} beats the serving {ll_s:.4f} by {gain:.4f}, less than {s.guard_z:g} standard "
                f"errors ({se:.4f})")
    au_s, au_c = auroc(y, p_s, w), auroc(y, p_c, w)
    if au_c < au_s - s.auroc_tolerance:
        return f"AUROC {au_c:.4f} below the serving {au_s:.4f} (tolerance {s.auroc_tolerance:g})"
    return None


# -- one backend, one pass ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    backend: str
    promoted: str | None  # the new version, if one was promoted
    kind: str | None
    reason: str
    n_train: int
    n_guard: int
    keys: int
    verdicts: dict[str, dict[str, Any]]  # per candidate kind: the guard's figures and decision
    dropped: dict[str, int]
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "promoted": self.promoted, "kind": self.kind, "reason": self.reason,
                "n_train": self.n_train, "n_guard": self.n_guard, "keys": self.keys, "verdicts": self.verdicts,
                "dropped": self.dropped, "seconds": round(self.seconds, 3)}


def learn(backend: str, examples: Sequence[LabelledExample], serving: Probe, anchor: Probe,
          settings: LearnerSettings) -> tuple[Candidate | None, Outcome]:
    """The candidate to promote for ``backend`` (or None) from ``examples``, and what was decided and why. Pure:
    nothing is read or written."""
    started = time.perf_counter()
    batch = select(examples, anchor, settings)
    train, guard = ~batch.guard, batch.guard
    n_train, n_guard = int(train.sum()), int(guard.sum())
    n_keys = len(set(batch.keys.tolist()))

    def outcome(reason: str, chosen: Candidate | None = None, name: str | None = None,
                verdicts: dict[str, dict[str, Any]] | None = None) -> Outcome:
        return Outcome(backend, name, chosen.kind if chosen else None, reason, n_train, n_guard, n_keys,
                       verdicts or {}, batch.dropped, time.perf_counter() - started)

    if n_train < settings.min_labels:
        return None, outcome(f"{n_train} training labels, fewer than min_labels {settings.min_labels}")
    if len(np.unique(batch.y[train] > 0.5)) < 2:
        return None, outcome("the training labels are all one outcome")
    cols = Columns(anchor, batch)
    tr, gd = np.flatnonzero(train), np.flatnonzero(guard)
    rated = np.array([e.rated_at for e in batch.examples])
    candidates: list[Candidate] = []
    verdicts: dict[str, dict[str, Any]] = {}
    fresh_for_platt = None
    if "recalibrate" in settings.kinds:
        # Platt on the serving logits of ratings its weights were not fitted on (in-sample logits are too sure).
        fitted_to = (serving.training.get("learning") or {}).get("fitted_to")
        fresh = tr if fitted_to is None else tr[rated[tr] > fitted_to]
        if len(fresh) >= settings.min_labels and len(np.unique(batch.y[fresh] > 0.5)) == 2:
            fresh_for_platt = fresh
        else:
            verdicts["recalibrate"] = {"promote": False, "reason": f"{len(fresh)} training labels newer than the "
                                       f"serving weights' fit, fewer than min_labels {settings.min_labels}"}
    # Each kind is fitted once per weighting: with the inverse-propensity weights (unbiased for the traffic the
    # backend will serve, but noisy: a few explored labels count ten times) and, if fit_weights asks, also
    # unweighted (biased toward the requests the policy already sends it, but steadier). All are judged the same
    # way, by cross-validated and guard losses weighted by inverse propensity (importance-weighted validation).
    for weighting in settings.fit_weights:
        fit_w = batch.w if weighting == "propensity" else np.ones(len(batch.w))
        suffix = "" if weighting == "propensity" else ":unweighted"
        if fresh_for_platt is not None:
            f = fresh_for_platt
            c = fit_recalibration(serving, cols, f, batch.y[f], batch.w[f], [batch.examples[i].id for i in f],
                                  settings.folds, fit_w=fit_w[f])
            candidates.append(replace(c, kind=c.kind + suffix, details=c.details | {
                "fitted_to": (serving.training.get("learning") or {}).get("fitted_to"), "n_fitted": len(f),
                "fit_weights": weighting}))
        if "refit" in settings.kinds:
            refit = fit_refit(anchor, cols, tr, batch.y[tr], batch.w[tr], [batch.examples[i].id for i in tr],
                              settings, fit_w=fit_w[tr])
            if refit is not None:
                candidates.append(replace(refit, kind=refit.kind + suffix, details=refit.details | {
                    "fitted_to": float(rated[tr].max()), "n_fitted": len(tr), "fit_weights": weighting}))
    p_serving = cols.probability(serving, gd)
    best: tuple[float, Candidate] | None = None
    for c in candidates:
        v = guard_verdict(batch.y[gd], batch.w[gd], batch.keys[gd], p_serving, cols.probability(c.probe, gd),
                          settings)
        verdicts[c.kind] = {"promote": v.promote, "reason": v.reason, "serving": v.serving,
                            "candidate": v.candidate, **c.details}
        if v.promote and (best is None or v.candidate["logloss"] < best[0]):
            best = (v.candidate["logloss"], c)
    if best is None:
        return None, outcome("no candidate passed the guard", verdicts=verdicts)
    return best[1], outcome("promoted", best[1], None, verdicts)


class Learner:
    """Reads the store, fits, guards and promotes into the registry: one pass per ``run_once``."""

    def __init__(self, store: ExampleStore, registry: Registry, settings: LearnerSettings,
                 anchors: Mapping[str, Probe], clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.registry = registry
        self.settings = settings
        self.anchors = dict(anchors)  # backend → the probe the refit is pulled toward (the shipped one)
        self.clock = clock
        self._last: dict[str, float] = {}  # backend → the newest rating its last refit read (this process)

    def due(self, backend: str) -> bool:
        """Whether ``backend`` has ``refit_every`` ratings newer than those its last refit read (in this process:
        after a restart every backend with ratings is due once)."""
        return self.store.count(backend, since=self._last.get(backend)) >= (
            self.settings.refit_every if backend in self._last else 1)

    def run_due(self) -> list[Outcome]:
        """One refit of each backend that is due (what a learner process runs every refit_interval_s)."""
        return [self.refit(b) for b in sorted(self.anchors) if self.due(b)]

    def refit(self, backend: str) -> Outcome:
        examples = self.store.recent(backend, self.settings.window,
                                     keys=list(self.settings.raters) if self.settings.raters is not None else None)
        newest = self.store.newest_rating(backend)
        if newest is not None:
            self._last[backend] = newest
        current, serving = self.registry.current(backend)
        chosen, outcome = learn(backend, examples, serving, self.anchors[backend], self.settings)
        if chosen is None:
            log.info("%s: %s (%d training, %d guard labels)", backend, outcome.reason, outcome.n_train,
                     outcome.n_guard)
            return outcome
        rated = [e.rated_at for e in examples]
        record = {"kind": chosen.kind, "fitted_to": chosen.details.get("fitted_to"), "n_train": outcome.n_train,
                  "n_guard": outcome.n_guard, "keys": outcome.keys,
                  "rated_from": min(rated), "rated_to": max(rated), "guard": outcome.verdicts[chosen.kind],
                  "settings": {"window": self.settings.window, "guard_fraction": self.settings.guard_fraction,
                               "per_key_cap": self.settings.per_key_cap, "max_weight": self.settings.max_weight,
                               "fit_weights": list(self.settings.fit_weights)}}
        name = self.registry.promote(backend, chosen.probe, record)
        log.info("%s: promoted %s (%s) over %s: guard log-loss %.4f → %.4f", backend, name, chosen.kind, current,
                 outcome.verdicts[chosen.kind]["serving"]["logloss"],
                 outcome.verdicts[chosen.kind]["candidate"]["logloss"])
        return replace(outcome, promoted=name)

    def run_once(self, backends: Sequence[str] | None = None) -> list[Outcome]:
        outcomes = [self.refit(b) for b in (backends or sorted(self.anchors))]
        return outcomes + (self.share_shift() if "shared_shift" in self.settings.kinds else [])

    def share_shift(self) -> list[Outcome]:
        """Shift the calibration of each backend with fewer than ``min_labels`` training ratings by the shift of
        the calibrated logit the other backends' ratings show (see the module doc); return what was done."""
        started = time.perf_counter()
        batches = {}
        for b, anchor in self.anchors.items():
            examples = self.store.recent(b, self.settings.window, keys=list(self.settings.raters)
                                         if self.settings.raters is not None else None)
            batch = select(examples, anchor, self.settings)
            batches[b] = (batch, Columns(anchor, batch), anchor)
        starved = [b for b, (batch, _, _) in batches.items() if int((~batch.guard).sum()) < self.settings.min_labels]
        donors = [b for b in batches if b not in starved]
        if not starved or not donors:
            return []
        delta, verdict = shared_shift([batches[b] for b in donors], self.settings)
        out = []
        for b in starved:
            batch, cols, anchor = batches[b]
            current, serving = self.registry.current(b)
            learning = serving.training.get("learning") or {}
            reason = verdict.reason
            candidate = replace(anchor, platt_b=anchor.platt_b + delta)
            if verdict.promote and learning.get("kind") == "shared_shift" and abs(learning["delta"] - delta) < 0.05:
                reason = f"already serving a shift of {learning['delta']:.3f}"
            elif verdict.promote and len(batch) >= 20:
                own_s = log_loss(batch.y, cols.probability(serving), batch.w)
                own_c = log_loss(batch.y, cols.probability(candidate), batch.w)
                if own_c > own_s:
                    reason = f"its own {len(batch)} ratings disagree (log-loss {own_s:.4f} → {own_c:.4f})"
            promote = reason == verdict.reason and verdict.promote
            name = None
            figures = {"promote": promote, "reason": reason, "delta": round(delta, 5), "donors": donors,
                       "serving": verdict.serving, "candidate": verdict.candidate}
            if promote:
                name = self.registry.promote(b, candidate, {
                    "kind": "shared_shift", "delta": delta, "donors": donors, "fitted_to": None, "n_own": len(batch),
                    "guard": figures})
                log.info("%s: promoted %s (shared shift %.3f from %s) over %s", b, name, delta, ", ".join(donors),
                         current)
            out.append(Outcome(b, name, "shared_shift" if promote else None, reason,
                               int((~batch.guard).sum()), int(batch.guard.sum()), len(set(batch.keys.tolist())),
                               {"shared_shift": figures}, batch.dropped, time.perf_counter() - started))
        return out


def shared_shift(donors: Sequence[tuple[Batch, Columns, Probe]], settings: LearnerSettings) -> tuple[float, Verdict]:
    """One shift δ of the calibrated logit for every donor backend's shipped probe, fitted on their training
    ratings (weighted), and the guard's verdict on their guard ratings (shipped calibration against shifted)."""
    s_tr, y_tr, w_tr, s_gd, y_gd, w_gd, k_gd = [], [], [], [], [], [], []
    for batch, cols, anchor in donors:
        s = anchor.platt_a * cols.logits(anchor) + anchor.platt_b
        s_tr.append(s[~batch.guard])
        y_tr.append(batch.y[~batch.guard])
        w_tr.append(batch.w[~batch.guard])
        s_gd.append(s[batch.guard])
        y_gd.append(batch.y[batch.guard])
        w_gd.append(batch.w[batch.guard])
        k_gd.append(batch.keys[batch.guard])
    s, y, w = np.concatenate(s_tr), np.concatenate(y_tr), np.concatenate(w_tr)
    (delta,) = fit_logistic(np.ones((len(s), 1)), y, w, prior=np.zeros(1), lam=1e-3, offset=s)
    sg = np.concatenate(s_gd)
    verdict = guard_verdict(np.concatenate(y_gd), np.concatenate(w_gd), np.concatenate(k_gd), sigmoid(sg),
                            sigmoid(sg + delta), settings)
    return float(delta), verdict
