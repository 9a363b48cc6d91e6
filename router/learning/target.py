"""Targets instead of raw thresholds: the threshold that holds a share of requests to dearer backends, a cost per
1,000 requests or an expected accuracy, moved from the recent distribution of estimates.

A fixed ``policy.threshold`` sends a different share of requests to the dear backend whenever the traffic mix
changes (harder questions: lower estimates: more requests over the threshold). The controller keeps a window of
recent routed requests. For each it records, once, how the request's route would change with the threshold: the
threshold policy (``router.policy.choose_by_threshold``, the gateway's own rule) evaluated at each of its
estimates gives a step function of t, and the controller keeps that function's measure (dear or not, cost, the
chosen backend's estimate) per step (``Entry``). The measure of the window at any t is then a sum of steps (a
streaming quantile of the estimates, for a dear-share target with two backends), and the controller picks the t
whose measure is closest to the target, corrected by how far the measure actually realised over the window has
strayed from it (``gain``), so that the realised value, not only the expected one, stays near the target.

Pure and clock-injected: ``observe`` adds an entry, ``refresh`` recomputes the threshold (numpy over the window:
milliseconds for a few thousand entries, so call it from a worker thread or a periodic task, not per request),
``threshold`` returns the last one. The window is plain data (``Entry.to_dict``, ``state``/``from_state``), so
replicas can share it (e.g. a Redis list that each replica appends to and reads back).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np

from router.policy import Decision, Option, choose_by_threshold


class TargetKind(StrEnum):
    DEAR_SHARE = "dear_share"  # share of requests sent to a backend dearer than the cheapest
    COST_PER_1K = "cost_per_1k"  # USD per 1,000 requests
    EXPECTED_ACCURACY = "expected_accuracy"  # mean estimate of the chosen backend


def measure(kind: TargetKind, decision_backend: str, options: Sequence[Option], dearer: Collection[str]) -> float:
    """What one routed request contributes to the target's measure."""
    if kind is TargetKind.DEAR_SHARE:
        return 1.0 if decision_backend in dearer else 0.0
    option = next(o for o in options if o.name == decision_backend)
    return option.cost * 1000.0 if kind is TargetKind.COST_PER_1K else option.p


@dataclass(frozen=True)
class Entry:
    """One routed request's measure as a step function of the threshold t: ``values[j]`` for
    ``breaks[j-1] < t ≤ breaks[j]`` (``values[0]`` for t ≤ breaks[0], ``values[-1]`` for t above every break);
    and the measure of where it actually went."""

    at: float
    breaks: tuple[float, ...]
    values: tuple[float, ...]
    realised: float

    def value_at(self, t: float) -> float:
        return self.values[int(np.searchsorted(self.breaks, t, side="left"))]

    def to_dict(self) -> dict[str, Any]:
        return {"at": self.at, "breaks": list(self.breaks), "values": list(self.values), "realised": self.realised}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Entry:
        breaks = tuple(float(v) for v in d["breaks"])
        values = tuple(float(v) for v in d["values"])
        if len(values) != len(breaks) + 1 or list(breaks) != sorted(breaks):
            raise ValueError("an entry needs sorted breaks and one more value than breaks")
        return cls(float(d["at"]), breaks, values, float(d["realised"]))


def make_entry(kind: TargetKind, options: Sequence[Option], *, fallback: str | None, dearer: Collection[str],
               sent_to: str, at: float) -> Entry:
    """The entry of a request routed among ``options`` by the threshold policy (with ``fallback``) that was sent
    to ``sent_to`` (the policy's choice, or an explored backend)."""
    breaks = sorted({float(o.p) for o in options})
    points = [*breaks, float(np.nextafter(breaks[-1], np.inf))]

    def at_threshold(t: float) -> float:
        decision: Decision = choose_by_threshold(options, t, fallback)
        return measure(kind, decision.backend, options, dearer)

    return Entry(float(at), tuple(breaks), tuple(at_threshold(t) for t in points),
                 measure(kind, sent_to, options, dearer))


class ThresholdController:
    """Holds ``kind`` at ``value`` by moving the threshold (see the module doc)."""

    def __init__(self, kind: TargetKind | str, value: float, *, initial: float, window: int = 1000,
                 min_entries: int = 100, gain: float = 4.0, feedback: int = 250, half_life: float | None = 60,
                 max_age_s: float | None = None, clock: Callable[[], float] = time.time) -> None:
        self.kind = TargetKind(kind)
        self.value = float(value)
        self.window = int(window)
        self.min_entries = int(min_entries)
        self.gain = float(gain)
        self.feedback = int(feedback)
        self.half_life = half_life
        self.max_age_s = max_age_s
        self.clock = clock
        self.initial = float(initial)
        self._threshold = float(initial)
        self._entries: deque[Entry] = deque(maxlen=self.window)
        self.expected: float | None = None  # the window's measure at the current threshold, from the last refresh
        self.realised: float | None = None  # the window's realised measure, at the last refresh

    def observe(self, entry: Entry) -> None:
        self._entries.append(entry)

    def extend(self, entries: Iterable[Entry]) -> None:
        self._entries.extend(entries)

    def replace(self, entries: Iterable[Entry]) -> None:
        """Hold ``entries`` (the newest ``window`` of them) as the window, e.g. a fleet's shared one."""
        self._entries = deque(entries, maxlen=self.window)

    def entries(self) -> list[Entry]:
        return list(self._entries)

    def threshold(self) -> float:
        return self._threshold

    def _expire(self) -> None:
        if self.max_age_s is None:
            return
        cutoff = self.clock() - self.max_age_s
        while self._entries and self._entries[0].at < cutoff:
            self._entries.popleft()

    def refresh(self) -> float:
        """Recompute the threshold from the window; keep the current one while the window holds fewer than
        ``min_entries``."""
        self._expire()
        entries = list(self._entries)
        if len(entries) < self.min_entries:
            return self._threshold
        realised = float(np.mean([e.realised for e in entries[-self.feedback:]]))
        goal = self.value + self.gain * (self.value - realised)
        n = len(entries)
        weights = (np.ones(n) if self.half_life is None
                   else 0.5 ** ((n - 1 - np.arange(n)) / max(float(self.half_life), 1e-9)))
        lows, measures = self._curve(entries, weights)
        # Each interval (lows[i], lows[i+1]] of t has one measure; choose the closest to the goal, then its middle.
        best = int(np.argmin(np.abs(measures - goal)))
        lo = lows[best]
        hi = lows[best + 1] if best + 1 < len(lows) else 1.0
        lo = max(lo, 0.0) if np.isfinite(lo) else 0.0
        self._threshold = float(np.clip((lo + max(hi, lo)) / 2.0, 0.0, 1.0))
        self.expected = float(measures[best])
        self.realised = realised
        return self._threshold

    @staticmethod
    def _curve(entries: Sequence[Entry], weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The window's weighted mean measure on each interval of t: ``lows[i] < t ≤ lows[i+1]`` (lows[0] = −∞)."""
        base = float(sum(w * e.values[0] for w, e in zip(weights, entries, strict=True)))
        points = [(b, w * (e.values[j + 1] - e.values[j]))
                  for w, e in zip(weights, entries, strict=True) for j, b in enumerate(e.breaks)]
        points.sort()
        b = np.array([p[0] for p in points])
        delta = np.array([p[1] for p in points])
        # Measure on t ≤ b[0] is base; just above b[i] it is base + Σ_{k ≤ i} delta[k] (ties merge).
        distinct = np.unique(b)
        cum = np.cumsum(delta)
        idx = np.searchsorted(b, distinct, side="right") - 1  # the last point at each distinct break
        measures = np.concatenate([[base], base + cum[idx]]) / float(np.sum(weights))
        lows = np.concatenate([[-np.inf], distinct])
        return lows, measures

    def state(self) -> dict[str, Any]:
        return {"kind": str(self.kind), "value": self.value, "threshold": self._threshold,
                "entries": [e.to_dict() for e in self._entries]}

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Replace the window (and the threshold) by ``state`` (e.g. what another replica shared)."""
        self._entries = deque((Entry.from_dict(e) for e in state.get("entries", [])), maxlen=self.window)
        if "threshold" in state:
            self._threshold = float(state["threshold"])
