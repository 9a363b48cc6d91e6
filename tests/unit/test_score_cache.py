"""The score cache in one replica's memory (router.score_cache): bounded, per key, per probe-set version, expiring;
its clock injected. Shared through Redis: tests/integration/test_score_cache_redis.py."""

from __future__ import annotations

from router.config import ScoreCacheConfig
from router.score_cache import ScoreCache
from tests.support.fakes import Clock

IDS = [1, 17, 4, 99]


def cache(entries: int = 8, ttl_s: float = 60.0) -> tuple[ScoreCache, Clock]:
    clock = Clock()
    return ScoreCache(ScoreCacheConfig(entries=entries, ttl_s=ttl_s), clock=clock), clock


async def test_a_prompt_sent_again_by_the_same_key_under_the_same_probes_hits() -> None:
    c, _ = cache()
    assert await c.get("alice", "v1", IDS) is None
    await c.put("alice", "v1", IDS, {"small": 0.91, "large": 0.97})
    assert await c.get("alice", "v1", list(IDS)) == {"small": 0.91, "large": 0.97}
    assert (c.hits, c.misses) == (1, 1)


async def test_another_key_another_version_or_other_ids_miss() -> None:
    c, _ = cache()
    await c.put("alice", "v1", IDS, {"small": 0.9})
    assert await c.get("bob", "v1", IDS) is None  # another key never learns what alice sent
    assert await c.get("", "v1", IDS) is None  # nor do anonymous requests
    assert await c.get("alice", "v2", IDS) is None  # new probes: a miss at once
    assert await c.get("alice", "v1", IDS[:-1]) is None
    assert await c.get("alice", "v1", [*IDS, 5]) is None
    assert c.misses == 5 and c.hits == 0


def test_the_entrys_name_keeps_the_three_parts_apart() -> None:
    names = {ScoreCache.digest(k, v, i) for k, v, i in [("ab", "c", IDS), ("a", "bc", IDS), ("abc", "", IDS),
                                                       ("a", "b", [1, 2]), ("a", "b", [258])]}
    assert len(names) == 5 and all(len(n) == 32 for n in names)


async def test_the_cache_keeps_at_most_its_entries_dropping_the_least_recently_used() -> None:
    c, _ = cache(entries=3)
    for i in range(3):
        await c.put("k", "v", [i], {"b": i / 10})
    assert await c.get("k", "v", [0]) == {"b": 0.0}  # 0 is now the most recently used
    await c.put("k", "v", [3], {"b": 0.3})
    assert len(c) == 3
    assert await c.get("k", "v", [1]) is None  # the least recently used went
    assert [await c.get("k", "v", [i]) is not None for i in (0, 2, 3)] == [True, True, True]
    for i in range(100):
        await c.put("k", "v", [100 + i], {"b": 0.5})
    assert len(c) == 3


async def test_an_estimate_expires_after_ttl() -> None:
    c, clock = cache(ttl_s=10)
    await c.put("k", "v", IDS, {"b": 0.5})
    clock.now += 9.9
    assert await c.get("k", "v", IDS) == {"b": 0.5}
    clock.now += 0.2
    assert await c.get("k", "v", IDS) is None and len(c) == 0


async def test_zero_entries_turns_it_off_and_callers_cannot_change_what_is_kept() -> None:
    off, _ = cache(entries=0)
    await off.put("k", "v", IDS, {"b": 0.5})
    assert not off.enabled and await off.get("k", "v", IDS) is None and len(off) == 0
    c, _ = cache()
    given = {"b": 0.5}
    await c.put("k", "v", IDS, given)
    given["b"] = 0.0
    got = await c.get("k", "v", IDS)
    assert got == {"b": 0.5}
    got["b"] = 1.0  # type: ignore[index]
    assert await c.get("k", "v", IDS) == {"b": 0.5}
