"""Stage 0 of a decision: the estimates made for a prompt, kept for when the same prompt comes again.

An entry is keyed by the exact token ids the scorer reads (after the template and truncation: two requests that
differ only in what the scorer never sees share it), the probe set's version (a digest the caller passes: a new
probe, calibration or threshold source misses at once) and the API key's name, and holds the estimates only
(backend name → probability). The key is a 32-byte BLAKE2b digest of the three: neither the prompt nor the key's
name is kept, in memory or in Redis.

Why per key: a cache shared by every key would be an oracle. A hit answers faster (no forward pass) and, wherever
the gateway says how a decision was made (a header, a log line a user can read, the unscored count), visibly
differently; a key could then learn that another key sent this exact prompt before, within the TTL, by sending it
itself and timing the answer. Scoped to a key, a hit tells a key only what it sent itself. The cost is a lower hit
rate where several keys send the same prompts, which is the case a leak would need.

In this replica's memory: a bounded LRU (``scorer.cache.entries``, 0 turns the cache off), each entry for
``ttl_s``. With ``state.redis_url`` and ``shared``, also in Redis (through the replica's one ``RedisState``
connection, for ``ttl_s``): a prompt scored by one replica is a hit on every other. Redis failing or slow never
fails a request: the call counts as a miss (get) or is skipped (put), the replica's memory answers alone, and
``RedisState`` leaves Redis alone for a while and says so in its metrics. Two identical requests at once may both
miss and both be scored: the cache saves work, it does not coordinate it.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import orjson

from router.config import ScoreCacheConfig
from router.state import RedisState

__all__ = ["ScoreCache"]

Estimates = dict[str, float]


class ScoreCache:
    """Estimates by (key, probe-set version, token ids): an LRU in memory and, optionally, Redis behind it."""

    def __init__(self, cfg: ScoreCacheConfig, redis: RedisState | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.redis = redis if cfg.shared and cfg.entries > 0 else None
        self._clock = clock
        self._entries: OrderedDict[bytes, tuple[float, Estimates]] = OrderedDict()  # digest -> (expiry, estimates)
        self.hits = 0  # from memory
        self.shared_hits = 0  # from Redis
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.cfg.entries > 0

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def digest(key: str, version: str, ids: Sequence[int]) -> bytes:
        """The entry's name: a digest of the key's name, the version and the token ids (each length-prefixed, so no
        two different triples share their bytes)."""
        h = hashlib.blake2b(digest_size=32, person=b"score-cache-v1")
        for part in (key.encode(), version.encode()):
            h.update(len(part).to_bytes(8, "little"))
            h.update(part)
        h.update(np.asarray(ids, dtype="<i8").tobytes())
        return h.digest()

    async def get(self, key: str, version: str, ids: Sequence[int]) -> Estimates | None:
        """The estimates this key was given for these ids under this version, within ``ttl_s``, or None."""
        if not self.enabled:
            return None
        name = self.digest(key, version, ids)
        now = self._clock()
        entry = self._entries.get(name)
        if entry is not None:
            if entry[0] > now:
                self._entries.move_to_end(name)
                self.hits += 1
                return dict(entry[1])
            del self._entries[name]
        if self.redis is not None:
            found = await self._get_shared(name)
            if found is not None:
                estimates, ttl_s = found
                self._remember(name, estimates, now + ttl_s)
                self.shared_hits += 1
                return dict(estimates)
        self.misses += 1
        return None

    async def put(self, key: str, version: str, ids: Sequence[int], estimates: Mapping[str, float]) -> None:
        """Keep ``estimates`` (backend → probability) for these ids, this key and this version."""
        if not self.enabled:
            return
        name = self.digest(key, version, ids)
        value = {str(k): float(v) for k, v in estimates.items()}
        self._remember(name, value, self._clock() + self.cfg.ttl_s)
        if self.redis is not None:
            redis, record, ttl_ms = self.redis, orjson.dumps(value), max(1, math.ceil(self.cfg.ttl_s * 1000))
            await redis.call("cache_put", lambda: redis.client.set(self._redis_key(name), record, px=ttl_ms))

    def _remember(self, name: bytes, estimates: Estimates, expires: float) -> None:
        self._entries[name] = (expires, estimates)
        self._entries.move_to_end(name)
        while len(self._entries) > self.cfg.entries:
            self._entries.popitem(last=False)

    def _redis_key(self, name: bytes) -> str:
        assert self.redis is not None
        return f"{self.redis.prefix}score:{name.hex()}"

    async def _get_shared(self, name: bytes) -> tuple[Estimates, float] | None:
        """(estimates, seconds left) from Redis; None on a miss, a failure, or a value that is not estimates."""
        assert self.redis is not None
        redis, redis_key = self.redis, self._redis_key(name)

        async def read() -> list[object]:
            async with redis.client.pipeline(transaction=False) as pipe:
                pipe.get(redis_key)
                pipe.pttl(redis_key)
                return await pipe.execute()

        ok, result = await redis.call("cache_get", read)
        if not ok or result is None or result[0] is None:
            return None
        try:
            raw = orjson.loads(result[0])  # type: ignore[arg-type]
            estimates = {str(k): float(v) for k, v in raw.items()}
        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
            return None
        left_ms = result[1] if isinstance(result[1], int) and result[1] > 0 else 0
        return (estimates, left_ms / 1000) if left_ms else None
