"""The scorer's time shared among API keys by tokens, not by requests.

A forward pass costs about its prompts' tokens (the packed pass has no padding), so a key that sends long prompts
takes more of the scorer per request than one that sends short questions. Counting requests (at most N of a key's
in the scorer) let one key with N prompts of 1,024 tokens fill every batch: another key's 100-token question then
waited behind them (issue #36: 85x its time alone). Two tools here, both torch-free:

- ``FairQueue``: per-key FIFO queues served by deficit round robin (Shreedhar and Varghese, 1995) with a quantum in
  tokens: each turn a key may take up to its deficit (unused allowance plus one quantum) in prompts' tokens, so over
  time every key with prompts waiting gets the same tokens, whatever the size of its prompts. The local scorer's
  batcher forms its batches from it (``router.scorer.batcher``), and estimates a key's wait from it (``ahead``).
- ``TokenBudget``: at most so many of a key's tokens in flight at once (the vLLM scorer, whose server batches by
  itself: a key waits for its own tokens to come back, never for another key's).

Neither is thread-safe: the batcher holds its lock around the queue; the budget lives on the event loop.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")

__all__ = ["FairQueue", "TokenBudget"]


@dataclass(eq=False)
class _Entry(Generic[T]):
    item: T
    cost: int


class FairQueue(Generic[T]):
    """Items (prompts) in per-key FIFO queues, each with a cost in tokens, taken by deficit round robin.

    ``quantum``: the tokens a key's allowance grows by at each of its turns (at least the largest cost, and a key
    can always take its next prompt in one turn). ``max_per_key``: the most items one key may have queued."""

    def __init__(self, quantum: int, max_per_key: int) -> None:
        if quantum < 1 or max_per_key < 1:
            raise ValueError("quantum and max_per_key must be positive")
        self.quantum = quantum
        self.max_per_key = max_per_key
        self._queues: dict[str, deque[_Entry[T]]] = {}
        self._tokens: dict[str, int] = {}  # queued tokens per key
        self._deficit: dict[str, int] = {}
        self._active: deque[str] = deque()  # keys with items, in turn order; the first one's turn is on
        self._turn_started = False  # whether the first key has had its quantum for this turn
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def queued(self, key: str) -> int:
        return len(self._queues.get(key, ()))

    def queued_tokens(self, key: str) -> int:
        return self._tokens.get(key, 0)

    def push(self, key: str, item: T, cost: int) -> bool:
        """Queue ``item`` for ``key``; False (nothing queued) when the key already has ``max_per_key`` waiting."""
        q = self._queues.get(key)
        if q is None:
            q = self._queues[key] = deque()
            self._tokens[key] = 0
            self._deficit[key] = 0
            self._active.append(key)
        elif len(q) >= self.max_per_key:
            return False
        q.append(_Entry(item, max(0, cost)))
        self._tokens[key] += max(0, cost)
        self._count += 1
        return True

    def remove(self, key: str, item: T) -> bool:
        """Take ``item`` out of its queue (a request that gave up waiting); False if it is not queued."""
        q = self._queues.get(key)
        if q is None:
            return False
        for entry in q:
            if entry.item is item:
                q.remove(entry)
                self._tokens[key] -= entry.cost
                self._count -= 1
                if not q:
                    self._leave(key)
                return True
        return False

    def pop(self, room: int | None = None) -> T | None:
        """The next item in deficit-round-robin order, if its cost fits ``room`` (None: any cost); else None, and
        the key whose turn it is keeps its turn and allowance for the next call (the next batch)."""
        while self._active:
            key = self._active[0]
            if not self._turn_started:
                self._deficit[key] += self.quantum
                self._turn_started = True
            q = self._queues[key]
            head = q[0]
            if head.cost <= self._deficit[key]:
                if room is not None and head.cost > room:
                    return None
                q.popleft()
                self._deficit[key] -= head.cost
                self._tokens[key] -= head.cost
                self._count -= 1
                if not q:
                    self._leave(key)
                return head.item
            self._active.rotate(-1)  # its turn is over; the allowance it did not use stays its own
            self._turn_started = False
        return None

    def ahead(self, key: str, cost: int) -> int:
        """About how many tokens are served before an item of ``cost`` queued now for ``key`` is: its key's queue
        and itself, and from every other key as many tokens as that (round robin gives each the same), or its
        whole queue if shorter. A key's backlog delays itself, and others by at most their own share."""
        own = self._tokens.get(key, 0) + cost
        return own + sum(min(tokens, own) for other, tokens in self._tokens.items() if other != key)

    def drain(self) -> list[T]:
        """Every queued item, the queues emptied."""
        items = [entry.item for q in self._queues.values() for entry in q]
        self._queues.clear()
        self._tokens.clear()
        self._deficit.clear()
        self._active.clear()
        self._turn_started = False
        self._count = 0
        return items

    def _leave(self, key: str) -> None:
        """A key whose queue emptied leaves the round, and its allowance with it (DRR's rule: an idle key saves
        nothing up)."""
        if self._active and self._active[0] == key:
            self._active.popleft()
            self._turn_started = False
        else:
            self._active.remove(key)
        del self._queues[key], self._tokens[key], self._deficit[key]


class TokenBudget:
    """At most ``budget`` tokens of each key in flight; a key's request waits (first come, first served among the
    key's own) until its tokens fit, or goes alone when it is larger than the whole budget. The table holds keys
    with tokens in flight or waiting only."""

    def __init__(self, budget: int) -> None:
        if budget < 1:
            raise ValueError("budget must be positive")
        self.budget = budget
        self._in_flight: dict[str, int] = {}
        self._waiting: dict[str, deque[tuple[int, asyncio.Future[None]]]] = {}

    def in_flight(self, key: str) -> int:
        return self._in_flight.get(key, 0)

    async def acquire(self, key: str, tokens: int) -> None:
        """Wait until ``tokens`` of ``key`` may be in flight, and count them (cancellation-safe)."""
        if not self._waiting.get(key) and self._fits(key, tokens):
            self._in_flight[key] = self._in_flight.get(key, 0) + tokens
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue = self._waiting.setdefault(key, deque())
        queue.append((tokens, waiter))
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():  # granted as it was cancelled: hand the tokens back
                self.release(key, tokens)
            else:
                if (tokens, waiter) in queue:
                    queue.remove((tokens, waiter))
                if not queue and self._waiting.get(key) is queue:
                    del self._waiting[key]
                self._wake(key)  # those behind it may fit now
            raise

    def release(self, key: str, tokens: int) -> None:
        left = self._in_flight.get(key, 0) - tokens
        if left > 0:
            self._in_flight[key] = left
        else:
            self._in_flight.pop(key, None)
        self._wake(key)

    def _fits(self, key: str, tokens: int) -> bool:
        used = self._in_flight.get(key, 0)
        return used == 0 or used + tokens <= self.budget

    def _wake(self, key: str) -> None:
        queue = self._waiting.get(key)
        while queue:
            tokens, waiter = queue[0]
            if waiter.done():  # cancelled; its acquire removes it
                queue.popleft()
                continue
            if not self._fits(key, tokens):
                return
            queue.popleft()
            self._in_flight[key] = self._in_flight.get(key, 0) + tokens
            waiter.set_result(None)
        self._waiting.pop(key, None)
