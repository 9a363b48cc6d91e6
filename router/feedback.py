"""Which backend answered what: a bounded, expiring memory so clients can rate answers afterwards."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple


class Answered(NamedTuple):
    backend: str
    p_success: float | None
    at: float
    alias: str | None  # the backend's completion id, usable in place of the gateway's request id
    owner: str  # the client key that received it: the only one that may rate it
    observation: str | None = None  # what the probe saw (router.learning.Observation as JSON), with learning on


class FeedbackStore:
    """Request ids → who answered, oldest first; at most ``max_entries``, each for at most ``ttl_s``."""

    def __init__(self, max_entries: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self.clock = clock
        # Plain tuples of str/float/None, not Answered: the collector stops tracking such tuples (exact tuples
        # only), so even a full store of 100,000 answers costs its collections nothing.
        self._entries: OrderedDict[str, tuple[str, float | None, float, str | None, str, str | None]] = OrderedDict()
        self._aliases: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def remember(self, request_id: str, backend: str, p_success: float | None, completion_id: str | None,
                 owner: str, observation: str | None = None) -> None:
        self._entries[request_id] = (backend, p_success, self.clock(), completion_id, owner, observation)
        if completion_id:
            self._aliases[completion_id] = request_id
        while len(self._entries) > self.max_entries:
            self._drop_oldest()

    def take(self, answer_id: str, owner: str) -> Answered | None:
        """The answer's record, once, for the key that received it: a second rating of the same answer, or one
        by another key, finds nothing (as for an unknown id, so ids of other keys' answers cannot be probed)."""
        self._expire()
        request_id = self._aliases.get(answer_id, answer_id)
        entry = self._entries.get(request_id)
        if entry is None or entry[4] != owner:
            return None
        del self._entries[request_id]
        answered = Answered(*entry)
        if answered.alias:
            self._aliases.pop(answered.alias, None)
        return answered

    def _drop_oldest(self) -> None:
        _, (_, _, _, alias, _, _) = self._entries.popitem(last=False)
        if alias:
            self._aliases.pop(alias, None)

    def _expire(self) -> None:
        cutoff = self.clock() - self.ttl_s
        while self._entries and Answered(*next(iter(self._entries.values()))).at < cutoff:
            self._drop_oldest()
