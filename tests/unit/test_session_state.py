"""The in-memory stores of pins and conversations: bounded, expiring, scoped by key (Redis: tests/integration/
test_session_state_redis.py)."""

from __future__ import annotations

import asyncio

from router.session_state import LocalAffinity, LocalConversations, TTLMemory
from tests.support.fakes import Clock


def test_memory_expires_entries_after_their_ttl_from_the_last_write() -> None:
    clock = Clock()
    memory: TTLMemory[str] = TTLMemory(max_entries=10, ttl_s=60, clock=clock)
    memory.put("a", "1")
    clock.now += 59
    assert memory.get("a") == "1"
    memory.put("a", "2")  # renewed
    clock.now += 59
    assert memory.get("a") == "2"
    clock.now += 1
    assert memory.get("a") is None and len(memory) == 0


def test_memory_is_bounded_dropping_the_least_recently_written() -> None:
    clock = Clock()
    memory: TTLMemory[int] = TTLMemory(max_entries=3, ttl_s=60, clock=clock)
    for i, key in enumerate("abc"):
        memory.put(key, i)
    memory.put("a", 9)  # a is now the newest
    memory.put("d", 3)
    assert len(memory) == 3 and memory.get("b") is None
    assert [memory.get(k) for k in "acd"] == [9, 2, 3]


def test_memory_drops_expired_entries_on_write() -> None:
    clock = Clock()
    memory: TTLMemory[int] = TTLMemory(max_entries=100, ttl_s=10, clock=clock)
    for i in range(50):
        memory.put(str(i), i)
    clock.now += 11
    memory.put("new", 1)
    assert len(memory) == 1


def test_local_affinity_pins_and_forgets() -> None:
    clock = Clock()
    store = LocalAffinity(max_entries=2, ttl_s=30, clock=clock)

    async def run() -> None:
        assert await store.get("s") is None
        await store.pin("s", "cheap")
        assert await store.get("s") == "cheap"
        await store.pin("s", "dear")  # a break re-pins
        assert await store.get("s") == "dear"
        clock.now += 31
        assert await store.get("s") is None

    asyncio.run(run())


def test_local_conversations_are_kept_per_key_copied_and_bounded_in_size() -> None:
    clock = Clock()
    store = LocalConversations(max_entries=10, ttl_s=30, max_bytes=2000, clock=clock)
    items = [{"type": "message", "role": "user", "content": "hi"}]

    async def run() -> None:
        assert await store.save("resp_1", items, owner="a")
        items[0]["content"] = "changed later"
        assert await store.load("resp_1", owner="a") == [{"type": "message", "role": "user", "content": "hi"}]
        assert await store.load("resp_1", owner="b") is None  # another key's conversation is not found
        assert await store.load("resp_2", owner="a") is None
        big = [{"role": "user", "content": "x" * 3000}]
        assert not await store.save("resp_big", big, owner="a")
        assert await store.load("resp_big", owner="a") is None
        clock.now += 31
        assert await store.load("resp_1", owner="a") is None

    asyncio.run(run())
