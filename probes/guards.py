"""Guard rails for training probes on few labels: before a fit, enough of each outcome to learn from; after it,
an out-of-fold AUROC whose 95% interval clears chance. ``probes train`` writes no probe and ``probes calibrate``
no threshold that fails either (unless ``--force``), and says why in plain words, per backend.

Both checks look at a backend's *own* labels (what C, Platt and the metrics use), whatever other label sets its
weights also learn from (``--train-labels``, ``--share-labels``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from probes.metrics import auroc, bootstrap_ci

__all__ = ["Chance", "Shortfall", "auroc_check", "label_shortfall", "min_per_class"]

MIN_PER_FOLD = 2  # of the rarer outcome in every inner held-out fold
MIN_ANY = 10  # and never fewer than this many of either outcome in all


def min_per_class(folds: int) -> int:
    """The fewest successes, and the fewest failures, a backend's own labels need before a probe is fitted.

    Training is nested K-fold cross-validation (stratified): each outer fold trains on (K−1)/K of the questions,
    and the inner K-fold that chooses C and fits Platt holds out a K-th of that. With n of an outcome, an inner
    held-out fold holds about n·(K−1)/K² of it; 2K²/(K−1) of each outcome leaves at least two in every inner
    held-out fold (so each has both outcomes to compute an AUROC on, and every fold of the split can be
    stratified), and never fewer than 10 in all: below that even a perfect direction in 576 features cannot be
    told from noise. 5 folds: 13; 10 folds: 23."""
    if folds < 2:
        raise ValueError("cross-validation needs at least 2 folds")
    return max(MIN_ANY, math.ceil(MIN_PER_FOLD * folds * folds / (folds - 1)))


@dataclass(frozen=True)
class Shortfall:
    """Too few of one outcome in a backend's labels to train a probe on."""

    backend: str
    successes: int
    failures: int
    needed: int  # of each outcome (``min_per_class``)
    folds: int

    @property
    def total(self) -> int:
        return self.successes + self.failures

    @property
    def rarer(self) -> tuple[str, int, str, int]:
        """(the rarer outcome's name, its count, the other's name, its count)."""
        if self.failures <= self.successes:
            return "failures", self.failures, "successes", self.successes
        return "successes", self.successes, "failures", self.failures

    @property
    def more(self) -> int:
        """About how many more questions to label to reach ``needed`` of the rarer outcome at its observed rate
        (none seen yet: at the highest rate that is still likely, 3 in ``total``, the rule of three)."""
        _, count, _, _ = self.rarer
        per_question = count / self.total if count else 3 / self.total
        return max(1, math.ceil(self.needed / per_question) - self.total)

    def message(self) -> str:
        name, count, other, other_count = self.rarer
        need = f"a probe needs {self.needed} of each outcome with {self.folds}-fold cross-validation"
        if count:
            head = f"only {count} {name}"
            why = f"at {count} in {self.total}, that makes about {self.needed} {name}; {need}"
            about = "about"
        else:
            head = f"no {name}"
            why = f"none yet, so likely at most 3 in {self.total}; {need}"
            about = "at least"
        return (f"{self.backend}: {head} (and {other_count} {other}) of {self.total} questions: label {about} "
                f"{self.more} more questions to train a probe ({why})")


def label_shortfall(backend: str, y: np.ndarray, folds: int) -> Shortfall | None:
    """A ``Shortfall`` when the 0/1 labels ``y`` hold fewer than ``min_per_class(folds)`` of either outcome."""
    y = np.asarray(y)
    successes = int(np.sum(y == 1))
    failures = int(len(y) - successes)
    needed = min_per_class(folds)
    if min(successes, failures) >= needed:
        return None
    return Shortfall(backend, successes, failures, needed, folds)


@dataclass(frozen=True)
class Chance:
    """A held-out AUROC and its bootstrap 95% interval; ``ok`` when the interval lies above 0.5."""

    backend: str
    auroc: float
    low: float
    high: float
    n: int
    what: str = "out-of-fold"  # or "held-out" (another file)

    @property
    def ok(self) -> bool:
        return self.low > 0.5

    def message(self) -> str:
        if np.isnan(self.auroc):
            return f"{self.backend}: {self.what} AUROC cannot be measured: its {self.n} questions have one outcome only"
        where = "includes 0.5 (chance)" if self.high >= 0.5 else "lies below 0.5 (worse than chance)"
        return (f"{self.backend}: {self.what} AUROC {self.auroc:.3f}, 95% interval [{self.low:.3f}, "
                f"{self.high:.3f}] {where}: on these {self.n} questions the probe does not tell right answers from "
                "wrong ones better than a coin; label more questions")


def auroc_check(backend: str, y: np.ndarray, p: np.ndarray, *, rounds: int = 1000, seed: int = 0,
                what: str = "out-of-fold") -> Chance:
    """The AUROC of held-out estimates ``p`` against ``y`` with its percentile bootstrap interval
    (``probes.metrics.bootstrap_ci``, resamples with one outcome skipped)."""
    y, p = np.asarray(y), np.asarray(p, dtype=np.float64)
    if len(np.unique(y)) < 2:
        return Chance(backend, float("nan"), float("nan"), float("nan"), len(y), what)
    lo, hi = bootstrap_ci(lambda idx: auroc(y[idx], p[idx]), len(y), rounds=rounds, seed=seed)
    return Chance(backend, auroc(y, p), lo, hi, len(y), what)
