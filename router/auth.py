"""Client keys: who is asking (constant-time comparison), and what each key may do and spend.

A key is identified by ``APIKeyMiddleware`` before anything else runs; wrong keys are throttled per client
address. An identified key (a ``Client``) carries its policy (``config.AccessPolicy``), its request and token
buckets and its count of requests in flight; ``Client.admit`` checks one parsed request against them and
returns the ``Grant`` the gateway routes within.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from router.config import DANGEROUS_EXTRAS, AccessPolicy, AuthConfig
from router.errors import AuthenticationFailed, InvalidRequest, PermissionDenied, RateLimited, RouterError
from router.http import error_response
from router.limits import Limiter, TokenBucket
from router.request import CompletionCall

CLIENT_SCOPE_KEY = "router.client"  # where the middleware leaves the identified Client in the ASGI scope
MEDIA_PARTS = ("image_url", "audio_url", "video_url", "file_url")  # chat parts, and Responses' input_image/_file
FAILED_AUTH_BURST = 10
MAX_TRACKED_ADDRESSES = 10_000


@dataclass(frozen=True)
class Grant:
    """An admitted request's token charge, to settle once the backend has reported its usage."""

    settle: Callable[[int | None], None] = lambda _used: None  # the backend's usage (prompt + completion)


NO_CHARGE = Grant()


@dataclass(frozen=True)
class Budget:
    """One of a key's buckets, kept by the ``Limiter`` (this replica's memory, or Redis across replicas)."""

    bucket: str
    rate_per_s: float
    burst: float


class Client:
    """One key (or, without keys, everyone) at run time: its policy, its budgets, its requests in flight."""

    def __init__(self, name: str, policy: AccessPolicy, limiter: Limiter) -> None:
        self.name = name
        self.policy = policy
        self.limiter = limiter
        self.backends = frozenset(policy.backends) if policy.backends is not None else None
        self.guarded = DANGEROUS_EXTRAS - set(policy.allowed_extras)
        self.requests = (Budget(f"requests:{name}", policy.requests_per_minute / 60, policy.burst)
                         if policy.requests_per_minute else None)
        self.tokens = (Budget(f"tokens:{name}", policy.tokens_per_minute / 60, policy.tokens_per_minute)
                       if policy.tokens_per_minute else None)
        self.in_flight = 0
        self._corrections: set[asyncio.Future[None]] = set()  # token-budget corrections under way

    async def take(self, budget: Budget, amount: float = 1) -> float:
        return await self.limiter.take(budget.bucket, budget.rate_per_s, budget.burst, amount)

    async def admit(self, call: CompletionCall, *, decision_only: bool = False) -> Grant:
        """Check a resolved request against this key's policy; charge its estimated tokens (``decision_only``, for
        POST /v1/route: only the prompt's, which the scorer reads; nothing is generated). A RouterError if
        refused."""
        p, request, body = self.policy, call.request, call.body
        if request.threshold_sent and not p.may_override_threshold:
            raise PermissionDenied(f"key {self.name!r} may not override the threshold (x-router-threshold)",
                                   param="x-router-threshold", code="permission_denied")
        if not request.routed and not p.may_name_backend:
            raise PermissionDenied(f"key {self.name!r} may only use the routed model", param="model",
                                   code="model_not_allowed")
        if request.routed and not request.scorable and not p.may_name_backend:
            raise PermissionDenied(f"key {self.name!r} may not send prompts without text (token ids, input with no "
                                   "text): they cannot be scored, and unscored requests go to the fallback backend",
                                   param="input" if call.conversation is not None else "prompt",
                                   code="permission_denied")
        if call.conversation is not None:  # its messages are text only: the media parts are in the raw items
            self._check_extras(body, call.conversation.items, "input")
        else:
            self._check_extras(body, request.messages, "messages")
        for name in ("n", "best_of"):
            value = body.get(name)
            if isinstance(value, int) and value > p.max_n:
                raise InvalidRequest(f"{name} may be at most {p.max_n} for key {self.name!r}", param=name,
                                     code="invalid_value")
        if p.max_output_tokens is not None:
            for name in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
                value = body.get(name)
                if isinstance(value, int) and value > p.max_output_tokens:
                    raise InvalidRequest(f"{name} may be at most {p.max_output_tokens} for key {self.name!r}",
                                         param=name, code="invalid_value")
        if self.tokens is None:
            return NO_CHARGE
        charged = await self._charge(request.prompt_tokens + (0 if decision_only else request.output_tokens))
        tokens, limiter, corrections = self.tokens, self.limiter, self._corrections

        def settle(used: int | None) -> None:  # from the answer's bookkeeping: the correction runs on its own
            if used is not None and used != charged:
                correction = limiter.adjust(tokens.bucket, tokens.rate_per_s, tokens.burst, charged - used)
                corrections.add(task := asyncio.ensure_future(correction))
                task.add_done_callback(corrections.discard)

        return Grant(settle)

    def _check_extras(self, body: Mapping[str, Any], messages: Sequence[Mapping[str, Any]], param: str) -> None:
        denied = self.guarded.intersection(body)
        if denied:
            name = sorted(denied)[0]
            raise PermissionDenied(f"key {self.name!r} may not send {name!r} (allow it in its allowed_extras)",
                                   param=name, code="extra_not_allowed")
        if "remote_media" in self.guarded:
            for m in messages:
                for content in (m.get("content"), m.get("output")):  # a message's parts, a tool output's parts
                    if isinstance(content, list) and any(_remote_media(part) for part in content):
                        raise PermissionDenied(f"key {self.name!r} may not send media by URL (allowed_extras: "
                                               "remote_media); send it inline as a data: URL", param=param,
                                               code="extra_not_allowed")

    async def _charge(self, estimate: int) -> int:
        assert self.tokens is not None
        if estimate > self.tokens.burst:
            raise RateLimited(f"this request needs about {estimate} tokens, more than key {self.name!r} may use "
                              f"in a minute ({int(self.tokens.burst)})", retry_after_s=None,
                              code="token_budget_exceeded")
        wait = await self.take(self.tokens, estimate)
        if wait > 0:
            raise RateLimited(f"token budget of key {self.name!r} spent; retry in {wait:.1f}s", retry_after_s=wait,
                              code="token_budget_exceeded")
        return estimate


def _remote_media(part: Any) -> bool:
    if not isinstance(part, Mapping):
        return False
    for kind in MEDIA_PARTS:
        ref = part.get(kind)
        url = ref.get("url") if isinstance(ref, Mapping) else ref
        if isinstance(url, str) and not url.startswith("data:"):
            return True
    return False


class Authenticator:
    def __init__(self, cfg: AuthConfig, limiter: Limiter, clock: Callable[[], float] = time.monotonic) -> None:
        """``limiter`` (router/state.py: this replica's memory, or Redis) keeps the keys' request and token
        budgets; wrong keys are throttled per address in this replica's memory (``clock``)."""
        legacy = cfg.legacy_policy()
        entries = [(k.get_secret_value(), Client(f"key-{i + 1}", legacy, limiter))
                   for i, k in enumerate(cfg.api_keys)]
        entries += [(k.secret(), Client(k.name, k, limiter)) for k in cfg.keys]
        # One client per configured key: memory is bounded by the config, not by what clients send.
        self._keys = [(secret.encode(), client) for secret, client in entries]
        self.anonymous = Client("anonymous", cfg.default_policy, limiter)
        self._failed_rate = cfg.failed_auth_per_minute / 60
        self._failures: OrderedDict[str, TokenBucket] = OrderedDict()  # per client address, most recent last
        self._clock = clock

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def _match(self, presented: bytes) -> Client | None:
        found = None
        for key, client in self._keys:  # no early exit: the time taken does not say which key matched
            if hmac.compare_digest(presented, key):
                found = client
        return found

    async def identify(self, authorization: str | None, address: str) -> Client:
        """The key's Client; AuthenticationFailed for a wrong key, RateLimited past the key's rate or the address's
        failures."""
        failures = self._failures.get(address)
        if failures is not None and (wait := failures.wait()) > 0:
            raise RateLimited(f"too many requests with a wrong key from this address; retry in {wait:.1f}s",
                              retry_after_s=wait)
        scheme, _, token = (authorization or "").partition(" ")
        client = self._match(token.strip().encode()) if scheme.lower() == "bearer" else None
        if client is None:
            self._failed(address)
            raise AuthenticationFailed("a valid API key is required: send 'Authorization: Bearer <key>'",
                                       code="invalid_api_key")
        if client.requests is not None and (wait := await client.take(client.requests)) > 0:
            raise RateLimited(f"rate limit reached for this key; retry in {wait:.1f}s", retry_after_s=wait)
        return client

    def _failed(self, address: str) -> None:
        bucket = self._failures.pop(address, None)
        if bucket is None:
            bucket = TokenBucket(self._failed_rate, FAILED_AUTH_BURST, self._clock)
            while len(self._failures) >= MAX_TRACKED_ADDRESSES:
                self._failures.popitem(last=False)
        self._failures[address] = bucket  # most recent last
        bucket.take()


class APIKeyMiddleware:
    """Pure ASGI: every request but ``open_paths`` needs a valid key (added only when keys are configured); a key
    may have at most its ``max_concurrent_requests`` in flight, streams included."""

    def __init__(self, app: ASGIApp, auth: Authenticator, open_paths: frozenset[str] = frozenset({"/health"})) -> None:
        self.app = app
        self.auth = auth
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        authorization = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None)
        address = scope["client"][0] if scope.get("client") else ""
        try:
            client = await self.auth.identify(authorization, address)
            if client.in_flight >= client.policy.max_concurrent_requests:
                raise RateLimited(f"key {client.name!r} has {client.in_flight} requests in flight, its limit",
                                  retry_after_s=1, code="concurrency_limit_exceeded")
        except RouterError as e:
            await error_response(e)(scope, receive, send)
            return
        scope[CLIENT_SCOPE_KEY] = client
        client.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            client.in_flight -= 1
