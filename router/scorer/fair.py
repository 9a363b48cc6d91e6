"""The scorer's time shared among API keys by tokens, not by requests.

A forward pass costs about its prompts' tokens (the packed pass has no padding), so a key that sends long prompts
takes more of the scorer per request than one that sends short questions. Counting requests (at most N of a key's
in the scorer) let one key with N prompts of 1,024 tokens fill every batch: another key's 100-token question then
waited behind them (issue #36: 85x its time alone). Two tools here, both torch-free:

- ``FairQueue``: per-key FIFO queues served by deficit round robin (Shreedhar and Varghese, 1995) with a quantum in
  tokens: each turn a key may take up to its deficit (unused allowance plus one quantum) in prompts' tokens, so over
  time every key with prompts waiting gets the same tokens, whatever the size of its prompts. The local scorer's
  batcher forms its batches from it (``router.scorer.batcher``), and estimates a key's wait from it (``ahead``). A
  long prompt scored in chunks is one item whose cost is its next chunk's tokens and which comes back to the front
  of its key's queue (``requeue``) after each chunk; its tokens after that chunk (``later``) count in its key's
  backlog all along.
- ``TokenBudget``: at most so many of a key's tokens in flight at once (the vLLM scorer, whose server batches by
  itself: a key waits for its own tokens to come back, never for another key's).

Neither is thread-safe: the batcher holds its lock around the queue; the budget lives on the event loop.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")

__all__ = ["FairQueue", "TokenBudget"]


def _take(counts: dict[str, int], key: str, tokens: int) -> None:
    """Take ``tokens`` from ``key``'s count, forgetting the key once nothing is left (the tables hold live keys
    only)."""
    left = counts.get(key, 0) - tokens
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)


@dataclass(eq=False)
class _Entry(Generic[T]):
    item: T
    cost: int  # what the key's allowance pays when the item is taken
    later: int = 0  # tokens the item brings back after it is taken (a long prompt's later chunks)


class FairQueue(Generic[T]):
    """Items (prompts) in per-key FIFO queues, each with a cost in tokens, taken by deficit round robin.

    ``quantum``: the tokens a key's allowance grows by at each of its turns (where an item costs more, its key
    saves its allowance over as many turns as it takes, the other keys' items taken between). ``max_per_key``: the
    most items one key may have queued."""

    def __init__(self, quantum: int, max_per_key: int) -> None:
        if quantum < 1 or max_per_key < 1:
            raise ValueError("quantum and max_per_key must be positive")
        self.quantum = quantum
        self.max_per_key = max_per_key
        self._queues: dict[str, deque[_Entry[T]]] = {}
        self._tokens: dict[str, int] = {}  # queued tokens per key (their items' costs and later tokens)
        self._held: dict[str, int] = {}  # per key, later tokens of its items taken and not yet back (or released)
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

    def backlog(self, key: str) -> int:
        """The key's tokens still to serve: queued, and those its taken items will bring back (``later``)."""
        return self._tokens.get(key, 0) + self._held.get(key, 0)

    def push(self, key: str, item: T, cost: int, later: int = 0) -> bool:
        """Queue ``item`` for ``key``; False (nothing queued) when the key already has ``max_per_key`` waiting.
        ``later``: tokens the item will bring back after it is taken (``requeue``)."""
        q = self._queues.get(key)
        if q is not None and len(q) >= self.max_per_key:
            return False
        self._enter(key).append(_Entry(item, max(0, cost), max(0, later)))
        self._tokens[key] += max(0, cost) + max(0, later)
        self._count += 1
        return True

    def requeue(self, key: str, item: T, cost: int, later: int = 0) -> None:
        """Put a taken item back at the front of its key's queue (whatever its bound: it was admitted), with the
        ``cost`` of its next turn; ``cost`` and ``later`` come out of the tokens it was to bring back."""
        _take(self._held, key, max(0, cost) + max(0, later))
        self._enter(key).appendleft(_Entry(item, max(0, cost), max(0, later)))
        self._tokens[key] += max(0, cost) + max(0, later)
        self._count += 1

    def release(self, key: str, later: int) -> None:
        """A taken item will not bring back its ``later`` tokens (dropped between chunks)."""
        _take(self._held, key, later)

    def remove(self, key: str, item: T) -> bool:
        """Take ``item`` out of its queue (a request that gave up waiting); False if it is not queued."""
        q = self._queues.get(key)
        if q is None:
            return False
        for entry in q:
            if entry.item is item:
                q.remove(entry)
                self._tokens[key] -= entry.cost + entry.later
                self._count -= 1
                if not q:
                    self._leave(key)
                return True
        return False

    def pop(self, room: int | None = None, fits: Callable[[T], bool] | None = None,
            waits: Callable[[T], bool] | None = None) -> T | None:
        """The next item in deficit-round-robin order, if its cost fits ``room`` (None: any cost) and ``fits`` says
        so; else None, and nothing changes: the key whose turn it is keeps its turn and allowance for the next call
        (the next batch), and no turn ends or begins, so that a key whose item arrives before that call is not
        put behind a turn begun for a batch that was already full. A key whose first item ``waits`` (it cannot be
        taken yet, whatever the batch) passes its turn to the next key without the turn's quantum; None where
        every key's does."""
        rotated, started, granted, passed = 0, self._turn_started, [], 0
        while self._active and passed < len(self._active):
            key = self._active[0]
            if not self._turn_started:
                self._deficit[key] += self.quantum
                self._turn_started = True
                granted.append(key)
            q = self._queues[key]
            head = q[0]
            if waits is not None and waits(head.item):
                if granted and granted[-1] == key:
                    self._deficit[key] -= self.quantum
                    granted.pop()
                self._active.rotate(-1)
                self._turn_started = False
                rotated += 1
                passed += 1
                continue
            passed = 0
            if head.cost <= self._deficit[key]:
                if (room is not None and head.cost > room) or (fits is not None and not fits(head.item)):
                    for k in granted:
                        self._deficit[k] -= self.quantum
                    self._active.rotate(rotated)
                    self._turn_started = started
                    return None
                q.popleft()
                self._deficit[key] -= head.cost
                self._tokens[key] -= head.cost + head.later
                if head.later:
                    self._held[key] = self._held.get(key, 0) + head.later
                self._count -= 1
                if not q:
                    self._leave(key)
                return head.item
            self._active.rotate(-1)  # its turn is over; the allowance it did not use stays its own
            self._turn_started = False
            rotated += 1
        if passed:  # every key's first item waits: as if not called
            for k in granted:
                self._deficit[k] -= self.quantum
            self._active.rotate(rotated)
            self._turn_started = started
        return None

    def ahead(self, key: str, cost: int) -> int:
        """About how many tokens are served before an item of ``cost`` queued now for ``key`` is: its key's backlog
        and itself, and from every other key as many tokens as that (round robin gives each the same), or its
        whole backlog if shorter. A key's backlog delays itself, and others by at most their own share."""
        own = self.backlog(key) + cost
        others = (self._tokens.keys() | self._held.keys()) - {key}
        return own + sum(min(self.backlog(other), own) for other in others)

    def drain(self) -> list[T]:
        """Every queued item, the queues emptied (and the tokens taken items were to bring back forgotten)."""
        items = [entry.item for q in self._queues.values() for entry in q]
        self._queues.clear()
        self._tokens.clear()
        self._held.clear()
        self._deficit.clear()
        self._active.clear()
        self._turn_started = False
        self._count = 0
        return items

    def _enter(self, key: str) -> deque[_Entry[T]]:
        """The key's queue; a key that had none joins the round at its end."""
        q = self._queues.get(key)
        if q is None:
            q = self._queues[key] = deque()
            self._tokens[key] = 0
            self._deficit[key] = 0
            self._active.append(key)
        return q

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
        _take(self._in_flight, key, tokens)
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
