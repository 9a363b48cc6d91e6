"""upstream.Deadlines: waits bounded by one shared timer behave as asyncio.timeout does (bounded, real loop)."""

from __future__ import annotations

import asyncio

import pytest

from router.upstream import Deadlines


async def test_a_wait_that_finishes_in_time_returns_its_result() -> None:
    deadlines = Deadlines()

    async def quick() -> str:
        await asyncio.sleep(0.01)
        return "done"

    assert await deadlines.within(5.0, quick()) == "done"


async def test_a_wait_past_its_deadline_is_cancelled_and_raises_timeout() -> None:
    deadlines = Deadlines()
    cancelled = asyncio.Event()

    async def forever() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    start = asyncio.get_running_loop().time()
    with pytest.raises(TimeoutError):
        await deadlines.within(0.05, forever())
    assert cancelled.is_set()
    assert 0.04 <= asyncio.get_running_loop().time() - start < 5.0
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]  # nothing left pending


async def test_each_wait_ends_at_its_own_deadline_whatever_the_order_they_began_in() -> None:
    deadlines = Deadlines()
    loop = asyncio.get_running_loop()
    ended: dict[str, float] = {}

    async def wait(name: str, seconds: float) -> None:
        start = loop.time()
        with pytest.raises(TimeoutError):
            await deadlines.within(seconds, asyncio.sleep(60))
        ended[name] = loop.time() - start

    async def in_time() -> str:
        return await deadlines.within(5.0, asyncio.sleep(0.05, "in time"))

    # a long one first, then a short one that must re-arm the timer earlier, then one that finishes in time
    results = await asyncio.gather(wait("long", 0.3), wait("short", 0.05), in_time())
    assert results[2] == "in time"
    assert 0.04 <= ended["short"] < ended["long"] and 0.29 <= ended["long"] < 5.0


async def test_the_callers_own_cancellation_is_not_turned_into_a_timeout() -> None:
    deadlines = Deadlines()
    task = asyncio.create_task(deadlines.within(0.05, asyncio.sleep(60)))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
