"""Pins and conversations in a real redis-server: shared by two replicas' stores, expiring, and kept in the
replica's own memory while Redis is down (no error reaches the caller)."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry

from router.config import StateConfig
from router.session_state import LocalAffinity, LocalConversations, RedisAffinity, RedisConversations
from router.state import RedisState
from scripts.redis_server import RedisServer

RETRY_AFTER_S = 0.3


def replica(url: str, ttl_s: float = 30) -> tuple[RedisState, RedisAffinity, RedisConversations]:
    state = RedisState(StateConfig(redis_url=url, retry_after_s=RETRY_AFTER_S), CollectorRegistry())
    return (state, RedisAffinity(state, ttl_s, LocalAffinity(100, ttl_s)),
            RedisConversations(state, ttl_s, LocalConversations(100, ttl_s, 10_000)))


def test_pins_and_conversations_are_shared_between_replicas(redis: RedisServer) -> None:
    async def run() -> None:
        (sa, pins_a, convs_a), (sb, pins_b, convs_b) = replica(redis.url), replica(redis.url)
        await pins_a.pin("session", "dear")
        assert await pins_b.get("session") == "dear"
        items = [{"type": "message", "role": "user", "content": "hi"}, {"type": "function_call", "name": "f"}]
        assert await convs_a.save("resp_1", items, owner="k")
        assert await convs_b.load("resp_1", owner="k") == items
        assert await convs_b.load("resp_1", owner="other") is None
        assert not await convs_a.save("resp_big", [{"content": "x" * 20_000}], owner="k")
        assert await convs_b.load("resp_big", owner="k") is None
        await sa.aclose()
        await sb.aclose()

    asyncio.run(run())


def test_entries_expire_in_redis(redis: RedisServer) -> None:
    async def run() -> None:
        state, pins, convs = replica(redis.url, ttl_s=0.2)
        await pins.pin("s", "cheap")
        await convs.save("r", [{"role": "user", "content": "x"}], owner="")
        assert await pins.get("s") == "cheap"
        await asyncio.sleep(0.3)
        assert await pins.get("s") is None and await convs.load("r", owner="") is None
        await state.aclose()

    asyncio.run(run())


def test_redis_down_falls_back_to_the_replicas_memory_without_errors(redis: RedisServer) -> None:
    async def run() -> None:
        state, pins, convs = replica(redis.url)
        await pins.pin("before", "cheap")
        redis.stop()
        assert await pins.get("before") is None  # what only Redis held is unreachable now, not an error
        await pins.pin("during", "dear")
        assert await convs.save("resp_d", [{"role": "user", "content": "x"}], owner="k")
        assert await pins.get("during") == "dear"
        assert await convs.load("resp_d", owner="k") == [{"role": "user", "content": "x"}]
        assert state.errors.labels("affinity_pin")._value.get() >= 1
        redis.start()
        await asyncio.sleep(RETRY_AFTER_S)
        assert await pins.get("during") == "dear"  # Redis lacks it; the replica's memory still answers
        await pins.pin("after", "cheap")
        assert await pins.get("after") == "cheap"
        assert state.up._value.get() == 1
        await state.aclose()

    asyncio.run(run())
