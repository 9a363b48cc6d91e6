"""Keys share the scorer by tokens: deficit round robin (router.scorer.fair.FairQueue), the batches the local
scorer's MicroBatcher forms from it, each key's own wait estimate, the vLLM scorer's per-key token budget; and the
early exit through the batcher and LocalScorer.score."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import pytest

from router.scorer.batcher import MicroBatcher
from router.scorer.fair import FairQueue, TokenBudget
from router.scorer.features import FeatureExtractor
from router.scorer.interface import EarlyExit, ScorerUnavailable
from router.scorer.local import LocalScorer

# FairQueue: pure, no threads, no clock


def _queued_items(quantum: int, *items: tuple[str, str, int]) -> FairQueue[str]:
    """A FairQueue (up to 100 items a key) with ``items`` (key, item, cost) pushed in that order."""
    q: FairQueue[str] = FairQueue(quantum=quantum, max_per_key=100)
    for key, item, cost in items:
        assert q.push(key, item, cost)
    return q


def test_one_key_is_served_first_come_first_served() -> None:
    q: FairQueue[int] = FairQueue(quantum=100, max_per_key=10)
    for i, cost in enumerate([50, 300, 7, 100]):
        assert q.push("a", i, cost)
    assert [q.pop() for _ in range(5)] == [0, 1, 2, 3, None]
    assert len(q) == 0


def test_keys_get_the_same_tokens_whatever_the_size_of_their_prompts() -> None:
    q: FairQueue[tuple[str, int]] = FairQueue(quantum=1024, max_per_key=1000)
    for _ in range(100):
        q.push("long", ("long", 1024), 1024)
    for _ in range(500):
        q.push("short", ("short", 100), 100)
    served = {"long": 0, "short": 0}
    for _ in range(200):
        key, cost = q.pop()  # type: ignore[misc]
        served[key] += cost
    # by requests the short key got 10x as many; by tokens, within one quantum of each other
    assert abs(served["long"] - served["short"]) <= 1024


def test_a_key_arriving_behind_a_backlog_is_served_within_one_turn() -> None:
    q: FairQueue[str] = FairQueue(quantum=1024, max_per_key=100)
    for i in range(50):
        q.push("flood", f"f{i}", 1024)
    assert q.pop() == "f0"
    q.push("other", "o0", 90)
    assert [q.pop(), q.pop()] == ["o0", "f1"]  # the flood's turn ended with f0: the other key's came next


def test_a_turn_that_does_not_fit_the_batch_is_kept_for_the_next() -> None:
    q = _queued_items(1024, ("a", "a0", 1024), ("b", "b0", 100))
    assert q.pop(room=500) is None  # a's turn, its prompt does not fit: the batch is full
    assert q.pop() == "a0"  # a keeps its turn and its allowance for the next batch
    assert q.pop() == "b0"


def test_a_key_arriving_while_a_full_batch_runs_goes_before_the_other_keys_next_turn() -> None:
    q: FairQueue[str] = FairQueue(quantum=256, max_per_key=100)
    q.push("a", "a0", 256)
    q.push("a", "a1", 256)
    assert q.pop() == "a0"
    assert q.pop(room=0) is None  # the batch is full: no turn ends or begins
    q.push("b", "b0", 100)  # b's question arrives while a0's pass runs
    assert [q.pop(), q.pop()] == ["b0", "a1"]


def test_a_key_whose_first_item_waits_passes_its_turn_without_its_quantum() -> None:
    q = _queued_items(100, ("a", "a0", 100), ("a", "a1", 100), ("b", "b0", 100), ("b", "b1", 100))
    waiting = {"a0"}
    assert q.pop(waits=waiting.__contains__) == "b0"
    assert q.pop(waits=waiting.__contains__) == "b1"
    assert q.pop(waits=waiting.__contains__) is None  # only a's, which waits: nothing changes
    assert q.pop(waits=waiting.__contains__) is None and len(q) == 2
    waiting.clear()
    # a saved nothing up while it waited: one quantum, one item a turn
    assert q.pop(room=100) == "a0" and q.pop(room=0) is None
    assert q.pop() == "a1" and len(q) == 0


def test_allowance_builds_up_over_turns_when_the_quantum_is_small() -> None:
    q = _queued_items(100, ("a", "a0", 250), ("b", "b0", 100), ("b", "b1", 100), ("b", "b2", 100))
    assert [q.pop() for _ in range(4)] == ["b0", "b1", "a0", "b2"]  # a saves up three quanta for its 250


def test_bounds_removal_and_the_wait_ahead() -> None:
    q: FairQueue[str] = FairQueue(quantum=1024, max_per_key=2)
    assert q.push("a", "a0", 1000) and q.push("a", "a1", 1000)
    assert not q.push("a", "a2", 1000)  # a's queue is full ...
    assert q.push("b", "b0", 100)  # ... not b's
    assert q.ahead("b", 100) == 200 + 200  # b's own 200, and as much of a's
    assert q.ahead("a", 1000) == 3000 + 100  # a's own 3000, and all of b's (shorter)
    assert q.remove("a", "a0") and not q.remove("a", "a0")
    assert q.queued("a") == 1 and q.queued_tokens("a") == 1000 and len(q) == 2
    assert sorted(q.drain()) == ["a1", "b0"] and len(q) == 0 and q.pop() is None


# The batcher's batches, with a feature function held by hand (no sleeping: it waits on events)


class HeldPasses:
    """A feature function that records each batch's keys (from a token id per key) and holds the first pass."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.batches: list[list[int]] = []

    def __call__(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        self.entered.set()
        self.release.wait(10)
        self.batches.append([ids[0] for ids in batch])
        return np.zeros((len(batch), 2), dtype=np.float32)

    async def let_go(self, tasks: Sequence[asyncio.Task]) -> None:
        """Release the held pass and wait for ``tasks`` to finish."""
        self.release.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 20)


@asynccontextmanager
async def held_batcher(**options: Any) -> AsyncIterator[tuple[MicroBatcher, HeldPasses]]:
    """A MicroBatcher (batches taken at once) over HeldPasses; on leaving, the pass released and the batcher
    closed."""
    passes = HeldPasses()
    batcher = MicroBatcher(passes, max_wait_s=0.0, **options)
    try:
        yield batcher, passes
    finally:
        passes.release.set()
        batcher.close()


A, B, W = 1, 2, 3  # the first token id says whose prompt it is


async def _queued(batcher: MicroBatcher, passes: HeldPasses, *jobs: tuple[str, int, int]) -> list[asyncio.Task]:
    """A held first pass, then ``jobs`` (key, first token, tokens) queued behind it, in that order."""
    first = asyncio.create_task(batcher.run([W], key="w"))
    await asyncio.to_thread(passes.entered.wait, 10)
    tasks = []
    for key, token, size in jobs:
        tasks.append(asyncio.create_task(batcher.run([token] * size, key=key, timeout_s=30)))
        await asyncio.sleep(0)  # queued in this order
    return [first, *tasks]


async def test_batches_alternate_keys_by_tokens_and_stay_under_the_token_cap() -> None:
    async with held_batcher(max_batch_size=16, max_queue=64, max_batch_tokens=1024,
                            quantum_tokens=1024) as (batcher, passes):
        await passes.let_go(await _queued(batcher, passes, *[("a", A, 1024)] * 4, *[("b", B, 100)] * 12))
    # one of a's prompts fills a batch; b's take turns with them, ten of its 100-token prompts to a batch
    assert passes.batches == [[W], [A], [B] * 10, [A], [B] * 2, [A], [A]]


async def test_one_key_alone_batches_as_before() -> None:
    async with held_batcher(max_batch_size=4, max_queue=64, max_batch_tokens=1024) as (batcher, passes):
        await passes.let_go(await _queued(batcher, passes, *[("a", A, 10)] * 10))
    assert passes.batches == [[W], [A] * 4, [A] * 4, [A] * 2]


async def test_a_prompt_longer_than_the_cap_runs_alone() -> None:
    async with held_batcher(max_batch_size=8, max_queue=64, max_batch_tokens=100) as (batcher, passes):
        await passes.let_go(await _queued(batcher, passes, ("a", A, 500), ("a", A, 30), ("a", A, 30)))
    assert passes.batches == [[W], [A], [A, A]]


async def test_a_flooding_key_is_refused_for_its_own_backlog_not_another_keys() -> None:
    async with held_batcher(max_batch_size=8, max_queue=64, max_batch_tokens=1024) as (batcher, passes):
        tasks = await _queued(batcher, passes, *[("a", A, 1000)] * 8)
        batcher._token_s = 0.001  # as if timed: a token takes 1 ms
        # what is left of the pass under way (at most its 1 token), a's 8000 queued and its own 1000
        assert batcher.expected_wait_s("a", 1000) == pytest.approx(9.0, abs=0.0011)
        # what is left of the pass under way, its own 100, and a's next 100 at most
        assert batcher.expected_wait_s("b", 100) == pytest.approx(0.2, abs=0.0011)
        with pytest.raises(ScorerUnavailable, match=r"queue would take about 9\.0s") as refused:
            await batcher.run([A] * 1000, key="a", timeout_s=5)
        assert refused.value.kind == "overloaded"
        scored = asyncio.create_task(batcher.run([B] * 100, key="b", timeout_s=5))  # not refused
        await asyncio.sleep(0)
        await passes.let_go([scored, *tasks])
    assert passes.batches[1] == [A] and passes.batches[2] == [B]  # b's came next, after the pass under way


async def test_the_estimate_counts_what_the_pass_under_way_has_left() -> None:
    async with held_batcher(max_batch_size=1, max_queue=8) as (batcher, passes):
        tasks = await _queued(batcher, passes)
        batcher._token_s = 1000.0  # as if timed: the held pass (1 token) takes 1000 s, and has just begun
        assert 999 < batcher.expected_wait_s("b", 1) - 1000.0 <= 1000
        batcher._token_s = 1e-6  # ... it should have ended long ago: nothing left of it
        assert batcher.expected_wait_s("b", 1) == pytest.approx(1e-6)
        await passes.let_go(tasks)


async def test_each_key_has_its_own_queue_bound() -> None:
    async with held_batcher(max_batch_size=1, max_queue=2) as (batcher, passes):
        tasks = await _queued(batcher, passes, ("a", A, 10), ("a", A, 10))
        with pytest.raises(ScorerUnavailable, match="queue is full"):
            await batcher.run([A], key="a")
        tasks.append(asyncio.create_task(batcher.run([B], key="b")))  # another key's queue has room
        await asyncio.sleep(0)
        await passes.let_go(tasks)


async def test_a_request_that_gives_up_leaves_the_queue() -> None:
    async with held_batcher(max_batch_size=1, max_queue=8) as (batcher, passes):
        tasks = await _queued(batcher, passes)
        with pytest.raises(ScorerUnavailable, match="longer than"):
            await batcher.run([A] * 50, key="a", timeout_s=0.05)
        assert len(batcher._queue) == 0 and batcher.expected_wait_s("b", 1) == 0.0  # nothing timed yet
        await passes.let_go(tasks)
    assert passes.batches == [[W]]  # the abandoned prompt never ran


async def test_an_early_exit_takes_the_staged_pass_and_comes_back_with_the_result() -> None:
    plain: list[int] = []
    staged_calls: list[list[EarlyExit | None]] = []

    def features(batch: Sequence[Sequence[int]]) -> np.ndarray:
        plain.append(len(batch))
        return np.ones((len(batch), 2), dtype=np.float32)

    def staged(batch: Sequence[Sequence[int]], exits: Sequence[EarlyExit | None]):  # type: ignore[no-untyped-def]
        staged_calls.append(list(exits))
        return [(None if e is None else np.full(1, e.layer, dtype=np.float32),
                 None if e is not None and e.should_stop(np.zeros(1)) else np.ones(2, dtype=np.float32))
                for e in exits]

    stop = EarlyExit(6, lambda f: True)
    batcher = MicroBatcher(features, max_batch_size=4, max_wait_s=0.05, max_queue=8, staged=staged)
    try:
        stopped, whole = await asyncio.gather(batcher.run([1], early=stop), batcher.run([2]))
        alone = await batcher.run([3])
    finally:
        batcher.close()
    assert staged_calls == [[stop, None]] and plain == [1]
    assert stopped.row is None and stopped.early is not None and stopped.early[0] == 6
    assert whole.early is None and whole.row is not None and alone.row is not None


async def test_local_scorer_stops_early_where_it_can_and_says_so(tiny_extractor: FeatureExtractor) -> None:
    scorer = LocalScorer(tiny_extractor, tiny_extractor.cfg)
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    ids = tiny_extractor.encoder.encode(messages)
    await scorer.start()
    try:
        stopped = await scorer.score(messages, key="k", early=EarlyExit(1, lambda f: True))
        went_on = await scorer.score(messages, early=EarlyExit(1, lambda f: False), ids=ids)
        not_there = await scorer.score(messages, early=EarlyExit(2, lambda f: True))  # layer 2 is the probed one
    finally:
        await scorer.aclose()
    assert scorer.early_exit_info(1) is not None and scorer.early_exit_info(2) is None
    assert stopped.stopped and stopped.features is None and stopped.early is not None
    assert stopped.early.shape == (scorer.early_exit_info(1).feature_dim,)  # type: ignore[union-attr]
    full = tiny_extractor.features_from_ids([ids])[0]
    assert not went_on.stopped and went_on.features is not None
    np.testing.assert_allclose(went_on.features, full, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(went_on.early, stopped.early, rtol=1e-5, atol=1e-6)  # type: ignore[arg-type]
    assert not not_there.stopped and not_there.early is None and not_there.features is not None


# The vLLM scorer's budget: tokens of one key in flight


async def test_a_keys_token_budget_holds_its_own_requests_only() -> None:
    budget = TokenBudget(2048)
    await budget.acquire("a", 1024)
    await budget.acquire("a", 1024)
    third = asyncio.create_task(budget.acquire("a", 1024))
    await asyncio.sleep(0)
    assert not third.done()  # a's budget is spent: its third waits
    await asyncio.wait_for(budget.acquire("b", 1024), 1)  # b's is its own
    budget.release("a", 1024)
    await asyncio.wait_for(third, 1)
    assert budget.in_flight("a") == 2048 and budget.in_flight("b") == 1024


async def test_a_prompt_larger_than_the_budget_goes_alone_and_a_cancelled_wait_leaves_no_trace() -> None:
    budget = TokenBudget(100)
    await budget.acquire("a", 500)  # nothing in flight: it goes
    waiting = asyncio.create_task(budget.acquire("a", 10))
    behind = asyncio.create_task(budget.acquire("a", 10))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    budget.release("a", 500)
    await asyncio.wait_for(behind, 1)
    assert budget.in_flight("a") == 10
    budget.release("a", 10)
    assert budget.in_flight("a") == 0 and not budget._waiting and not budget._in_flight


async def test_a_key_refused_for_its_own_backlog_costs_no_tokenising(tiny_extractor: FeatureExtractor) -> None:
    scorer = LocalScorer(tiny_extractor, tiny_extractor.cfg)
    await scorer.start()
    await scorer.score([{"role": "user", "content": "Hi"}])  # after the warm-up, which times a pass
    calls = []
    encode = scorer.encoder.encode
    scorer.encoder.encode = lambda messages: calls.append(1) or encode(messages)  # type: ignore[method-assign]
    try:
        assert scorer._batcher is not None
        scorer._batcher._token_s = 1.0  # as if timed: a token takes 1 s, so any prompt takes more than 0.5 s
        with pytest.raises(ScorerUnavailable, match="would take about") as refused:
            await scorer.score([{"role": "user", "content": "x" * 100_000}], 0.5, key="a")
        assert refused.value.kind == "overloaded" and calls == []
    finally:
        del scorer.encoder.encode
        await scorer.aclose()


async def test_long_messages_are_tokenised_off_the_event_loop(tiny_extractor: FeatureExtractor) -> None:
    encoder = tiny_extractor.encoder
    threads: list[str] = []
    encode = encoder.encode
    encoder.encode = lambda m: threads.append(threading.current_thread().name) or encode(m)  # type: ignore[method-assign]
    try:
        short = [{"role": "user", "content": "What is 2 + 2?"}]
        long = [{"role": "user", "content": [{"type": "text", "text": "eggs " * 10_000}]}]
        many = [{"role": "user", "content": "x"}] * 100
        for messages in (short, long, many):
            assert await encoder.encode_async(messages) == encode(messages)
    finally:
        del encoder.encode
    main = threading.current_thread().name
    assert threads[0] == main and threads[1] != main and threads[2] != main


def test_the_token_count_known_before_tokenising_never_exceeds_the_real_one(tiny_extractor: FeatureExtractor) -> None:
    encoder = tiny_extractor.encoder
    limit = encoder.max_prompt_tokens
    for messages in ([{"role": "user", "content": "Hi"}], [{"role": "user", "content": "eggs " * 5000}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"text": "a b c"}]}],
                     [{"role": "user", "content": "x"}] * 200, [{"role": "user", "content": None}]):
        assert 1 <= encoder.min_tokens(messages) <= len(encoder.encode(messages))
    assert encoder.min_tokens([{"role": "user", "content": "y" * 10**6}]) == limit  # a huge prompt: the limit
