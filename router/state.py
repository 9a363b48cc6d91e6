"""What gateway replicas share: per-key rate limits and the answers awaiting feedback.

Two implementations of each small interface (``router.limits.Limiter``, ``AnswerStore``): in the replica's own
memory (one replica, the default) and in Redis (``state.redis_url``: limits counted across replicas, feedback
answerable by any replica). Redis unreachable never fails a request: each call falls back to the replica's own
memory (limits then hold per replica, feedback ids are answerable by the replica that issued them), Redis is left
alone for ``state.retry_after_s``, and ``router_state_up`` / ``router_state_errors_total`` show it
(docs/reliability.md).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

import orjson
import redis.asyncio as redis
from prometheus_client import CollectorRegistry, Counter, Gauge
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from router.config import StateConfig
from router.feedback import Answered, FeedbackStore
from router.limits import Limiter, LocalLimiter

log = logging.getLogger(__name__)
T = TypeVar("T")


class AnswerStore(Protocol):
    async def remember(self, request_id: str, backend: str, p_success: float | None,
                       completion_id: str | None, owner: str, observation: str | None = None) -> None:
        """Keep who answered (and, with learning on, what its probe saw: ``observation``) until rated or expired."""
        ...

    async def take(self, answer_id: str, owner: str) -> Answered | None:
        """The answer's record, once (by the gateway's request id or the backend's completion id), for the key
        that received it (``owner``); for any other key, nothing, as for an unknown id."""
        ...


class LocalAnswers:
    """``feedback.FeedbackStore`` (bounded, expiring, in this process) behind the ``AnswerStore`` interface."""

    def __init__(self, store: FeedbackStore) -> None:
        self.store = store

    async def remember(self, request_id: str, backend: str, p_success: float | None,
                       completion_id: str | None, owner: str, observation: str | None = None) -> None:
        self.store.remember(request_id, backend, p_success, completion_id, owner, observation)

    async def take(self, answer_id: str, owner: str) -> Answered | None:
        return self.store.take(answer_id, owner)


class RedisState:
    """The Redis connection shared by the limiter and the answer store, and whether it is usable now."""

    def __init__(self, cfg: StateConfig, registry: CollectorRegistry, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        assert cfg.redis_url is not None
        self.cfg = cfg
        self.prefix = cfg.key_prefix
        # No retries inside redis-py: a call that fails falls back at once; the next try waits retry_after_s.
        self.client = redis.Redis.from_url(cfg.redis_url, socket_timeout=cfg.timeout_s,
                                           socket_connect_timeout=cfg.timeout_s, retry=Retry(NoBackoff(), 0))
        self._clock = clock
        self._down_until = 0.0
        self._healthy = True
        self.up = Gauge("router_state_up", "1 while Redis (state.redis_url) answers, 0 while this replica falls "
                        "back to its own memory for limits and feedback", registry=registry)
        self.up.set(1)
        self.errors = Counter("router_state_errors", "Calls to Redis that failed or were skipped while it was "
                              "down (the replica's own memory answered instead), by operation", ["op"],
                              registry=registry)
        self._bucket_script = self.client.register_script(_TOKEN_BUCKET)

    async def call(self, op: str, work: Callable[[], Awaitable[T]]) -> tuple[bool, T | None]:
        """(True, result) from Redis, or (False, None) when it is down or fails now (counted, never raised)."""
        if self._clock() < self._down_until:
            self.errors.labels(op).inc()
            return False, None
        try:
            async with asyncio.timeout(self.cfg.timeout_s * 2):
                result = await work()
        except (RedisError, OSError, TimeoutError) as e:
            if self._healthy:  # log the change only
                log.warning("Redis at %s unusable (%s): limits and feedback fall back to this replica's memory "
                            "for %gs", self.cfg.redis_url, e, self.cfg.retry_after_s)
            self._down_until = self._clock() + self.cfg.retry_after_s
            self._healthy = False
            self.up.set(0)
            self.errors.labels(op).inc()
            return False, None
        if not self._healthy:
            self._healthy = True
            self.up.set(1)
            log.warning("Redis at %s answers again: limits and feedback are shared", self.cfg.redis_url)
        return True, result

    async def bucket(self, name: str, rate_per_s: float, burst: float, amount: float, adjust: bool) -> float:
        keys = [f"{self.prefix}bucket:{name}"]
        args = [repr(rate_per_s), repr(burst), repr(amount), "adjust" if adjust else "take"]
        return float(await self._bucket_script(keys=keys, args=args))

    async def aclose(self) -> None:
        await self.client.aclose()


# A token bucket in one atomic step, on Redis's clock (replicas' clocks may disagree). Returns the wait in
# seconds as a string (Lua numbers become integers on their way out of a script).
_TOKEN_BUCKET = """
local rate, burst, amount = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'updated')
local tokens = tonumber(state[1]) or burst
local updated = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - updated) * rate)
local wait = 0
if ARGV[4] == 'adjust' then
  tokens = math.min(burst, tokens + amount)
elseif tokens >= amount then
  tokens = tokens - amount
else
  wait = (amount - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'updated', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 1)
return tostring(wait)
"""


class RedisLimiter:
    """Buckets counted in Redis across replicas; while Redis is down, in this replica's memory (``fallback``)."""

    def __init__(self, state: RedisState, fallback: LocalLimiter) -> None:
        self.state = state
        self.fallback = fallback

    async def take(self, bucket: str, rate_per_s: float, burst: float, amount: float = 1) -> float:
        ok, wait = await self.state.call("limit", lambda: self.state.bucket(bucket, rate_per_s, burst, amount, False))
        return wait if ok and wait is not None else await self.fallback.take(bucket, rate_per_s, burst, amount)

    async def adjust(self, bucket: str, rate_per_s: float, burst: float, amount: float) -> None:
        ok, _ = await self.state.call("limit", lambda: self.state.bucket(bucket, rate_per_s, burst, amount, True))
        if not ok:
            await self.fallback.adjust(bucket, rate_per_s, burst, amount)


class RedisAnswers:
    """Answers kept in Redis for ``ttl_s`` (GETDEL: rated once, whichever replica is asked); while Redis is down,
    in this replica's memory (``fallback``), where ``take`` also looks for ids remembered during an outage."""

    def __init__(self, state: RedisState, ttl_s: float, fallback: LocalAnswers) -> None:
        self.state = state
        self.ttl_ms = int(ttl_s * 1000)
        self.fallback = fallback

    def _answer_key(self, request_id: str) -> str:
        return f"{self.state.prefix}answer:{request_id}"

    def _alias_key(self, completion_id: str) -> str:
        return f"{self.state.prefix}alias:{completion_id}"

    async def remember(self, request_id: str, backend: str, p_success: float | None,
                       completion_id: str | None, owner: str, observation: str | None = None) -> None:
        record = orjson.dumps([backend, p_success, time.time(), completion_id, owner, observation])

        async def write() -> None:
            async with self.state.client.pipeline(transaction=False) as pipe:
                pipe.set(self._answer_key(request_id), record, px=self.ttl_ms)
                if completion_id:
                    pipe.set(self._alias_key(completion_id), request_id, px=self.ttl_ms)
                await pipe.execute()

        ok, _ = await self.state.call("remember", write)
        if not ok:
            await self.fallback.remember(request_id, backend, p_success, completion_id, owner, observation)

    async def take(self, answer_id: str, owner: str) -> Answered | None:
        async def read() -> bytes | None:
            request_id = await self.state.client.get(self._alias_key(answer_id))
            key = self._answer_key(request_id.decode() if request_id else answer_id)
            record = await self.state.client.get(key)
            if record is None or Answered(*orjson.loads(record)).owner != owner:
                return None  # another key's answer stays for its owner to rate
            # of two ratings racing for one answer, only the one whose DEL removed it counts
            return record if await self.state.client.delete(key) == 1 else None

        ok, record = await self.state.call("take", read)
        if ok and record is not None:
            answered = Answered(*orjson.loads(record))
            if answered.alias:
                await self.state.call("take", lambda: self.state.client.delete(self._alias_key(answered.alias)))
            return answered
        return await self.fallback.take(answer_id, owner)


class SharedState:
    """The limiter and the answer store one app uses: Redis-backed with ``state.redis_url``, else local."""

    def __init__(self, cfg: StateConfig, feedback: FeedbackStore, registry: CollectorRegistry) -> None:
        local = LocalLimiter()
        self.redis = RedisState(cfg, registry) if cfg.redis_url else None
        if self.redis is None:
            self.limiter: Limiter = local
            self.answers: AnswerStore = LocalAnswers(feedback)
        else:
            self.limiter = RedisLimiter(self.redis, local)
            self.answers = RedisAnswers(self.redis, feedback.ttl_s, LocalAnswers(feedback))

    async def aclose(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()
