"""``policy.target`` held by a fleet: each replica's routed decisions join one window in Redis, so every replica
moves its threshold from the whole fleet's traffic (a replica that sees little traffic, or another mix, still holds
the fleet's target). Without Redis, or while it is down, a replica holds the target on its own window.

Every ``refresh_s`` a replica pushes the entries it made since its last push (RPUSH, then LTRIM to the window),
reads the window back (LRANGE) and recomputes its threshold from it (``ThresholdController.refresh``). An entry is
a few numbers (the steps of the request's measure over the threshold): a window of 1,000 is tens of kilobytes."""

from __future__ import annotations

import orjson

from router.learning.target import Entry, TargetKind, ThresholdController
from router.state import RedisState


class SharedTarget:
    """A ``ThresholdController`` whose window is shared through Redis (``state`` None: its own)."""

    def __init__(self, controller: ThresholdController, state: RedisState | None) -> None:
        self.controller = controller
        self.state = state
        self._pending: list[Entry] = []
        self.key = f"{state.prefix}target:window" if state is not None else ""

    @property
    def kind(self) -> TargetKind:
        return self.controller.kind

    def threshold(self) -> float:
        return self.controller.threshold()

    def observe(self, entry: Entry) -> None:
        self.controller.observe(entry)
        if self.state is not None:
            self._pending.append(entry)

    async def refresh(self) -> float:
        """Share what this replica added, take the fleet's window, and recompute the threshold."""
        if self.state is not None:
            pending, self._pending = self._pending, []
            state, key, window = self.state, self.key, self.controller.window

            async def exchange() -> list[bytes]:
                async with state.client.pipeline(transaction=True) as pipe:
                    if pending:
                        pipe.rpush(key, *(orjson.dumps(e.to_dict()) for e in pending))
                        pipe.ltrim(key, -window, -1)
                    pipe.lrange(key, 0, -1)
                    results = await pipe.execute()
                return list(results[-1])

            ok, shared = await state.call("target", exchange)
            if ok and shared is not None:
                self.controller.replace([Entry.from_dict(orjson.loads(raw)) for raw in shared])
            else:  # kept for the next try; meanwhile this replica's own window holds
                self._pending = pending + self._pending
        return self.controller.refresh()
