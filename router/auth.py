"""Client API keys (constant-time comparison) and an optional per-key request rate limit (token bucket)."""

from __future__ import annotations

import hmac
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from starlette.types import ASGIApp, Receive, Scope, Send

from router.config import AuthConfig
from router.errors import APIError, error_response

if TYPE_CHECKING:
    from router.state import Limiter


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


class Authenticator:
    def __init__(self, cfg: AuthConfig, limiter: Limiter | None = None) -> None:
        """``limiter`` (router/state.py: this process's memory or Redis) counts the keys' rate limits; it is
        needed only when ``cfg`` sets one."""
        self._keys = [k.get_secret_value().encode() for k in cfg.api_keys]
        self._rate_per_s = cfg.rate_limit_per_minute / 60 if cfg.rate_limit_per_minute else None
        self._burst = cfg.rate_limit_burst
        if self._rate_per_s is not None and limiter is None:
            raise ValueError("a rate limit needs a limiter (router.state)")
        self._limiter = limiter

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def _match(self, presented: bytes) -> int | None:
        found = None
        for i, key in enumerate(self._keys):  # no early exit: the time taken does not say which key matched
            if hmac.compare_digest(presented, key):
                found = i
        return found

    async def check(self, authorization: str | None) -> None:
        if not self._keys:
            return
        scheme, _, token = (authorization or "").partition(" ")
        index = self._match(token.strip().encode()) if scheme.lower() == "bearer" else None
        if index is None:
            raise APIError(401, "a valid API key is required: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"www-authenticate": "Bearer"})
        if self._limiter is None or self._rate_per_s is None:
            return
        # One bucket per configured key (named by its place in the config): memory is bounded by the config.
        if (wait := await self._limiter.take(f"key-{index + 1}", self._rate_per_s, self._burst)) > 0:
            raise APIError(429, f"rate limit reached for this key; retry in {wait:.1f}s", code="rate_limit_exceeded",
                           headers={"retry-after": str(math.ceil(wait))})


class APIKeyMiddleware:
    """Pure ASGI: every request but ``open_paths`` needs a valid key (added only when keys are configured)."""

    def __init__(self, app: ASGIApp, auth: Authenticator, open_paths: frozenset[str] = frozenset({"/health"})) -> None:
        self.app = app
        self.auth = auth
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.open_paths:
            authorization = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None)
            try:
                await self.auth.check(authorization)
            except APIError as e:
                await error_response(e.status, e.message, e.param, e.code, e.headers)(scope, receive, send)
                return
        await self.app(scope, receive, send)
