"""A circuit breaker per backend: closed → open after consecutive failures → one trial after a cooldown.

Pure state with an injected clock, so it is tested without sleeping. Passive signals (request outcomes) and
active ones (health checks) feed the same breaker.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum


class State(StrEnum):
    CLOSED = "closed"  # healthy: a routing candidate
    OPEN = "open"  # failing: left out until the cooldown ends
    HALF_OPEN = "half_open"  # cooldown over: one trial request decides


@dataclass
class Breaker:
    failure_threshold: int = 3
    cooldown_s: float = 10.0
    clock: Callable[[], float] = time.monotonic
    state: State = State.CLOSED
    failures: int = 0
    opened_at: float = field(default=0.0)
    trial_in_flight: bool = False

    def _refresh(self) -> None:
        if self.state is State.OPEN and self.clock() - self.opened_at >= self.cooldown_s:
            self.state = State.HALF_OPEN
            self.trial_in_flight = False

    @property
    def current(self) -> State:
        self._refresh()
        return self.state

    def available(self) -> bool:
        """Whether a request may be sent now (does not claim the half-open trial)."""
        self._refresh()
        return self.state is State.CLOSED or (self.state is State.HALF_OPEN and not self.trial_in_flight)

    def begin(self) -> None:
        """A request is about to be sent; in half-open state it is the one trial."""
        self._refresh()
        if self.state is State.HALF_OPEN:
            self.trial_in_flight = True

    def success(self) -> None:
        self.state = State.CLOSED
        self.failures = 0
        self.trial_in_flight = False

    def healthy(self) -> None:
        """An active health check passed: an open circuit may try one request now (that request decides)."""
        if self.state is State.OPEN:
            self.state = State.HALF_OPEN
            self.trial_in_flight = False

    def failure(self) -> None:
        self._refresh()
        self.failures += 1
        self.trial_in_flight = False
        if self.state is State.HALF_OPEN or self.failures >= self.failure_threshold:
            self.state = State.OPEN
            self.opened_at = self.clock()
