"""Client API keys (constant-time comparison) and an optional per-key request rate limit (token bucket)."""

from __future__ import annotations

import hmac
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Receive, Scope, Send

from router.config import AuthConfig
from router.errors import APIError, error_response


@dataclass
class TokenBucket:
    rate_per_s: float
    burst: int
    clock: Callable[[], float] = time.monotonic
    tokens: float = field(init=False)
    updated: float = field(init=False)

    def __post_init__(self) -> None:
        self.tokens = float(self.burst)
        self.updated = self.clock()

    def take(self) -> float:
        """0 if a request may go now (and count it), else the seconds until one may."""
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate_per_s)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate_per_s


class Authenticator:
    def __init__(self, cfg: AuthConfig) -> None:
        self._keys = [k.get_secret_value().encode() for k in cfg.api_keys]
        per_s = cfg.rate_limit_per_minute / 60 if cfg.rate_limit_per_minute else None
        # One bucket per configured key: memory is bounded by the config, not by what clients send.
        self._buckets = {i: TokenBucket(per_s, cfg.rate_limit_burst) for i in range(len(self._keys))} if per_s else {}

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def _match(self, presented: bytes) -> int | None:
        found = None
        for i, key in enumerate(self._keys):  # no early exit: the time taken does not say which key matched
            if hmac.compare_digest(presented, key):
                found = i
        return found

    def check(self, authorization: str | None) -> None:
        if not self._keys:
            return
        scheme, _, token = (authorization or "").partition(" ")
        index = self._match(token.strip().encode()) if scheme.lower() == "bearer" else None
        if index is None:
            raise APIError(401, "a valid API key is required: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"www-authenticate": "Bearer"})
        bucket = self._buckets.get(index)
        if bucket is not None and (wait := bucket.take()) > 0:
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
                self.auth.check(authorization)
            except APIError as e:
                await error_response(e.status, e.message, e.param, e.code, e.headers)(scope, receive, send)
                return
        await self.app(scope, receive, send)
