"""What replicas share about conversations: the backend each session is pinned to (``router.affinity``) and the
items of the responses a later request may continue (``previous_response_id``, ``router.responses``).

Each has a small interface and two implementations, as ``router.state``: in this replica's memory (bounded,
expiring) and in Redis (``state.redis_url``, through ``router.state.RedisState``: keys expire after their TTL;
Redis's own ``maxmemory`` with ``volatile-ttl`` bounds the whole, as docker-compose.yml configures it). Redis
unreachable never fails a request: each call falls back to the replica's own memory, where a later read also
looks, so a conversation continued on the same replica during an outage keeps its pin and its items.

Stored conversations are recorded whole under each response id (the full item list, not a link to the previous
response): one read expands a follow-up, whatever its depth, and a response stays usable after the ones before
it expired. The price is storage that grows with the square of a conversation's turns, bounded by
``responses.max_conversation_bytes`` (a longer conversation is not recorded: following it up gets a 404, as for an
expired one, and the client can send the items itself) and by the TTL.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Generic, Protocol, TypeVar

import orjson

from router.config import AffinityConfig, ResponsesConfig
from router.state import RedisState

__all__ = [
    "AffinityStore",
    "ConversationStore",
    "LocalAffinity",
    "LocalConversations",
    "RedisAffinity",
    "RedisConversations",
    "TTLMemory",
    "open_affinity",
    "open_conversations",
]

V = TypeVar("V")
F = TypeVar("F")


class TTLMemory(Generic[V]):
    """key → value, at most ``max_entries`` (least recently written dropped first), each for ``ttl_s`` after it was
    last written. Plain ``OrderedDict``: O(1) per call, expired entries dropped as they are met and from the old
    end on each write."""

    def __init__(self, max_entries: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self.clock = clock
        self._entries: OrderedDict[str, tuple[float, V]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= self.clock():
            del self._entries[key]
            return None
        return entry[1]

    def put(self, key: str, value: V) -> None:
        now = self.clock()
        self._entries[key] = (now + self.ttl_s, value)
        self._entries.move_to_end(key)
        while self._entries:
            oldest_key, (expires, _) = next(iter(self._entries.items()))
            if len(self._entries) <= self.max_entries and expires > now:
                break
            del self._entries[oldest_key]


class AffinityStore(Protocol):
    async def get(self, session: str) -> str | None:
        """The backend ``session`` is pinned to, if it is pinned and the pin has not expired."""
        ...

    async def pin(self, session: str, backend: str) -> None:
        """Pin ``session`` to ``backend`` for the TTL from now (a later turn renews it)."""
        ...


class LocalAffinity:
    """Pins in this replica's memory."""

    def __init__(self, max_entries: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.memory: TTLMemory[str] = TTLMemory(max_entries, ttl_s, clock)

    async def get(self, session: str) -> str | None:
        return self.memory.get(session)

    async def pin(self, session: str, backend: str) -> None:
        self.memory.put(session, backend)


class _InRedis(Generic[F]):
    """What the Redis stores share: one key per id under the state's prefix and the store's ``namespace``, written
    with the TTL (``SET … PX``), and ``fallback``, this replica's memory, for what Redis cannot take or give now."""

    namespace: str

    def __init__(self, state: RedisState, ttl_s: float, fallback: F) -> None:
        self.state = state
        self.ttl_ms = max(int(ttl_s * 1000), 1)
        self.fallback = fallback

    def _key(self, name: str) -> str:
        return f"{self.state.prefix}{self.namespace}:{name}"

    async def _read(self, op: str, name: str) -> Any:
        """The value under ``name``; None when there is none, or Redis is down."""
        ok, value = await self.state.call(op, lambda: self.state.client.get(self._key(name)))
        return value if ok else None

    async def _write(self, op: str, name: str, value: str | bytes) -> bool:
        """Set ``name``'s value for the TTL; False when Redis is down (nothing written)."""
        ok, _ = await self.state.call(op, lambda: self.state.client.set(self._key(name), value, px=self.ttl_ms))
        return ok


class RedisAffinity(_InRedis[LocalAffinity]):
    """Pins in Redis, one key each with the TTL (``SET … PX``); while Redis is down, in ``fallback``."""

    namespace = "affinity"

    async def get(self, session: str) -> str | None:
        value = await self._read("affinity_get", session)
        if value is not None:
            return value.decode() if isinstance(value, bytes) else str(value)
        return await self.fallback.get(session)

    async def pin(self, session: str, backend: str) -> None:
        if not await self._write("affinity_pin", session, backend):
            await self.fallback.pin(session, backend)


class ConversationStore(Protocol):
    async def save(self, response_id: str, items: Sequence[dict[str, Any]], owner: str) -> bool:
        """Record a response's conversation (its full item list) for the key that received it; False when it is
        larger than the store takes (then nothing is recorded)."""
        ...

    async def load(self, response_id: str, owner: str) -> list[dict[str, Any]] | None:
        """The items recorded under ``response_id`` for ``owner``; None if unknown, expired or another key's."""
        ...


def _encode(items: Sequence[dict[str, Any]], owner: str) -> bytes:
    return orjson.dumps({"owner": owner, "items": list(items)})


def _decode(record: bytes, owner: str) -> list[dict[str, Any]] | None:
    doc = orjson.loads(record)
    return doc["items"] if doc.get("owner") == owner else None


class LocalConversations:
    """Conversations in this replica's memory, kept encoded (compact, and a copy nobody can change)."""

    def __init__(self, max_entries: int, ttl_s: float, max_bytes: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.memory: TTLMemory[bytes] = TTLMemory(max_entries, ttl_s, clock)
        self.max_bytes = max_bytes

    async def save(self, response_id: str, items: Sequence[dict[str, Any]], owner: str) -> bool:
        record = _encode(items, owner)
        if len(record) > self.max_bytes:
            return False
        self.memory.put(response_id, record)
        return True

    async def load(self, response_id: str, owner: str) -> list[dict[str, Any]] | None:
        record = self.memory.get(response_id)
        return None if record is None else _decode(record, owner)


class RedisConversations(_InRedis[LocalConversations]):
    """Conversations in Redis, one key per response id with the TTL; while Redis is down, in ``fallback``, where
    ``load`` also looks for what was saved during an outage."""

    namespace = "response"

    async def save(self, response_id: str, items: Sequence[dict[str, Any]], owner: str) -> bool:
        record = _encode(items, owner)
        if len(record) > self.fallback.max_bytes:
            return False
        if await self._write("conversation_save", response_id, record):
            return True
        return await self.fallback.save(response_id, items, owner)

    async def load(self, response_id: str, owner: str) -> list[dict[str, Any]] | None:
        record = await self._read("conversation_load", response_id)
        if record is not None:
            return _decode(record, owner)
        return await self.fallback.load(response_id, owner)


def open_affinity(cfg: AffinityConfig, redis: RedisState | None) -> AffinityStore | None:
    """The pins an app keeps (``affinity``): in Redis when the app shares state through it, else in memory; None
    when affinity is off."""
    if not cfg.enabled:
        return None
    local = LocalAffinity(cfg.max_entries, cfg.ttl_s)
    return local if redis is None else RedisAffinity(redis, cfg.ttl_s, local)


def open_conversations(cfg: ResponsesConfig, redis: RedisState | None) -> ConversationStore:
    """The Responses conversations an app keeps (``responses``): in Redis when the app shares state through it,
    else in memory."""
    local = LocalConversations(cfg.max_entries, cfg.store_ttl_s, cfg.max_conversation_bytes)
    return local if redis is None else RedisConversations(redis, cfg.store_ttl_s, local)
