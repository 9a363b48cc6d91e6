"""Rate limits: the token bucket, and the ``Limiter`` interface that keeps named buckets.

``LocalLimiter`` keeps them in this process; ``router.state.RedisLimiter`` keeps them in Redis, shared by replicas.
Keys (``router.auth``) and the edge's throttling of wrong keys both count with ``TokenBucket``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class TokenBucket:
    rate_per_s: float
    burst: float
    clock: Callable[[], float] = time.monotonic
    tokens: float = field(init=False)
    updated: float = field(init=False)

    def __post_init__(self) -> None:
        self.tokens = float(self.burst)
        self.updated = self.clock()

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate_per_s)
        self.updated = now

    def wait(self, amount: float = 1) -> float:
        """0 if ``amount`` is available now, else the seconds until it is (nothing is taken)."""
        self._refill()
        return 0.0 if self.tokens >= amount else (amount - self.tokens) / self.rate_per_s

    def take(self, amount: float = 1) -> float:
        """0 if ``amount`` may go now (and take it), else the seconds until it may."""
        wait = self.wait(amount)
        if wait == 0:
            self.tokens -= amount
        return wait

    def adjust(self, amount: float) -> None:
        """Give back (positive) or charge more (negative, down below zero if need be)."""
        self._refill()
        self.tokens = min(self.burst, self.tokens + amount)


class Limiter(Protocol):
    async def take(self, bucket: str, rate_per_s: float, burst: float, amount: float = 1) -> float:
        """0 if ``amount`` may go now from the named bucket (and take it), else the seconds until it may."""
        ...

    async def adjust(self, bucket: str, rate_per_s: float, burst: float, amount: float) -> None:
        """Give back (positive) or charge more (negative, below zero if need be)."""
        ...


class LocalLimiter:
    """One ``TokenBucket`` per bucket name, in this process (names come from the config: bounded)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._buckets: dict[str, TokenBucket] = {}
        self._clock = clock

    def _bucket(self, name: str, rate_per_s: float, burst: float) -> TokenBucket:
        bucket = self._buckets.get(name)
        if bucket is None:
            bucket = self._buckets[name] = TokenBucket(rate_per_s, burst, self._clock)
        return bucket

    async def take(self, bucket: str, rate_per_s: float, burst: float, amount: float = 1) -> float:
        return self._bucket(bucket, rate_per_s, burst).take(amount)

    async def adjust(self, bucket: str, rate_per_s: float, burst: float, amount: float) -> None:
        self._bucket(bucket, rate_per_s, burst).adjust(amount)
