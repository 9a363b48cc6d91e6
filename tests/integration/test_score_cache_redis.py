"""The score cache shared by two replicas through a real redis-server (router.score_cache over router.state's
RedisState): a hit on the other replica, per key and version; Redis holds digests and estimates only, expiring;
Redis stopped (every call answers, from the replica's own memory) and restarted."""

from __future__ import annotations

import asyncio

import orjson
import redis as redis_py
from prometheus_client import CollectorRegistry

from router.config import ScoreCacheConfig, StateConfig
from router.score_cache import ScoreCache
from router.state import RedisState
from scripts.redis_server import RedisServer

IDS = [1, 17, 4, 99, 12]
RETRY_AFTER_S = 0.3


def replica(redis: RedisServer, ttl_s: float = 60.0) -> tuple[ScoreCache, RedisState, CollectorRegistry]:
    registry = CollectorRegistry()
    state = RedisState(StateConfig(redis_url=redis.url, key_prefix="t:", retry_after_s=RETRY_AFTER_S), registry)
    return ScoreCache(ScoreCacheConfig(entries=16, ttl_s=ttl_s), state), state, registry


def test_an_estimate_made_on_one_replica_is_a_hit_on_the_other_for_the_same_key_only(redis: RedisServer) -> None:
    async def run() -> None:
        (a, state_a, _), (b, state_b, _) = replica(redis), replica(redis)
        try:
            await a.put("alice", "v1", IDS, {"small": 0.93, "large": 0.98})
            assert await b.get("alice", "v1", IDS) == {"small": 0.93, "large": 0.98}
            assert b.shared_hits == 1 and len(b) == 1  # ... and now in b's memory too
            assert await b.get("alice", "v1", IDS) is not None and b.hits == 1
            assert await b.get("bob", "v1", IDS) is None  # another key
            assert await b.get("alice", "v2", IDS) is None  # new probes
        finally:
            await state_a.aclose()
            await state_b.aclose()

    asyncio.run(run())
    raw = redis_py.Redis(port=redis.port)
    keys = raw.keys("*")
    assert len(keys) == 1 and keys[0].startswith(b"t:score:") and len(keys[0]) == len("t:score:") + 64
    assert orjson.loads(raw.get(keys[0])) == {"small": 0.93, "large": 0.98}  # estimates only: no prompt, no key
    assert 0 < raw.pttl(keys[0]) <= 60_000
    raw.close()


def test_a_shared_estimate_expires_with_its_ttl(redis: RedisServer) -> None:
    async def run() -> list[object]:
        (a, state_a, _), (b, state_b, _) = replica(redis, ttl_s=0.3), replica(redis, ttl_s=0.3)
        try:
            await a.put("k", "v", IDS, {"b": 0.5})
            fresh = await b.get("k", "v", IDS)
            await asyncio.sleep(0.4)
            return [fresh, await b.get("k", "v", IDS), await a.get("k", "v", IDS)]
        finally:
            await state_a.aclose()
            await state_b.aclose()

    assert asyncio.run(run()) == [{"b": 0.5}, None, None]


def test_redis_stopped_answers_from_memory_and_restarted_is_shared_again(redis: RedisServer) -> None:
    async def run() -> None:
        (a, state_a, registry), (b, state_b, _) = replica(redis), replica(redis)
        try:
            await a.put("k", "v", [1], {"b": 0.1})
            redis.stop()
            await a.put("k", "v", [2], {"b": 0.2})  # no error: kept in a's memory
            assert await a.get("k", "v", [2]) == {"b": 0.2}
            assert await a.get("k", "v", [1]) == {"b": 0.1}  # a's memory still has what it made
            assert await b.get("k", "v", [1]) is None  # b cannot reach it now: a miss, not an error
            errors = registry.get_sample_value("router_state_errors_total", {"op": "cache_put"})
            assert errors is not None and errors >= 1
            assert registry.get_sample_value("router_state_up") == 0
            redis.start()  # empty: no persistence
            await asyncio.sleep(RETRY_AFTER_S + 0.1)  # each replica tries Redis again after state.retry_after_s
            await b.put("k", "v", [3], {"b": 0.3})
            assert await a.get("k", "v", [3]) == {"b": 0.3}
            assert registry.get_sample_value("router_state_up") == 1
        finally:
            await state_a.aclose()
            await state_b.aclose()

    asyncio.run(run())
