"""Which backend answered what: a bounded, expiring memory so clients can rate answers afterwards."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Answered:
    backend: str
    p_success: float | None
    at: float
    alias: str | None  # the backend's completion id, usable in place of the gateway's request id


class FeedbackStore:
    """Request ids → who answered, oldest first; at most ``max_entries``, each for at most ``ttl_s``."""

    def __init__(self, max_entries: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self.clock = clock
        self._entries: OrderedDict[str, Answered] = OrderedDict()
        self._aliases: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def remember(self, request_id: str, backend: str, p_success: float | None, completion_id: str | None) -> None:
        self._entries[request_id] = Answered(backend, p_success, self.clock(), completion_id)
        if completion_id:
            self._aliases[completion_id] = request_id
        while len(self._entries) > self.max_entries:
            self._drop_oldest()

    def take(self, answer_id: str) -> Answered | None:
        """The answer's record, once: a second rating of the same answer finds nothing."""
        self._expire()
        request_id = self._aliases.get(answer_id, answer_id)
        answered = self._entries.pop(request_id, None)
        if answered is not None and answered.alias:
            self._aliases.pop(answered.alias, None)
        return answered

    def _drop_oldest(self) -> None:
        _, answered = self._entries.popitem(last=False)
        if answered.alias:
            self._aliases.pop(answered.alias, None)

    def _expire(self) -> None:
        cutoff = self.clock() - self.ttl_s
        while self._entries and next(iter(self._entries.values())).at < cutoff:
            self._drop_oldest()
