"""Load generators and their figures: ``hey`` for plain requests, an asyncio/aiohttp client for streams.

``hey`` (Go) is far cheaper per request than any Python client, so it measures throughput and latency of
non-streamed requests. Streams need time to the first SSE event, which hey cannot see, and the routed path
needs a different prompt per request, which hey cannot send: both use ``async_load``, whose own cost is
small next to targets that answer a few thousand requests a second or fewer.
"""

from __future__ import annotations

import asyncio
import csv
import io
import itertools
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np


@dataclass
class Load:
    """What one load run saw."""

    requests: int
    errors: int
    wall_s: float
    latencies_s: list[float]
    ttfb_s: list[float] = field(default_factory=list)  # streams: until the first SSE event

    @property
    def rps(self) -> float:
        return (self.requests - self.errors) / self.wall_s if self.wall_s > 0 else 0.0


def percentiles_ms(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    p50, p90, p99 = np.percentile(np.asarray(values) * 1000, [50, 90, 99])
    return {"p50": round(float(p50), 3), "p90": round(float(p90), 3), "p99": round(float(p99), 3)}


def hey_load(url: str, body: bytes, requests: int, concurrency: int, headers: dict[str, str] | None = None,
             timeout_s: float = 120.0) -> Load:
    """``requests`` POSTs of ``body`` with ``concurrency`` workers (requests is rounded down to a multiple)."""
    requests = max(concurrency, requests // concurrency * concurrency)
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        f.write(body)
        f.flush()
        cmd = ["hey", "-n", str(requests), "-c", str(concurrency), "-m", "POST", "-T", "application/json",
               "-D", f.name, "-t", "30", "-o", "csv"]
        for k, v in (headers or {}).items():
            cmd += ["-H", f"{k}: {v}"]
        out = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=timeout_s, check=True).stdout
    rows = list(csv.DictReader(io.StringIO(out)))
    ok = [r for r in rows if r["status-code"] == "200"]
    starts = [float(r["offset"]) for r in rows]
    ends = [float(r["offset"]) + float(r["response-time"]) for r in rows]
    wall = (max(ends) - min(starts)) if rows else 0.0
    return Load(requests, requests - len(ok), wall, [float(r["response-time"]) for r in ok])


async def _async_load(url: str, bodies: Sequence[bytes], requests: int, concurrency: int,
                      stream: bool) -> Load:
    latencies: list[float] = []
    ttfbs: list[float] = []
    errors = 0
    counter = itertools.count()
    timeout = aiohttp.ClientTimeout(total=60)
    connector = aiohttp.TCPConnector(limit=concurrency, ttl_dns_cache=None)
    headers = {"content-type": "application/json"}
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def worker() -> None:
            nonlocal errors
            while (i := next(counter)) < requests:
                start = time.perf_counter()
                first = None
                try:
                    async with session.post(url, data=bodies[i % len(bodies)], headers=headers) as response:
                        if stream:
                            async for chunk in response.content.iter_any():
                                if first is None and b"data:" in chunk:
                                    first = time.perf_counter()
                        else:
                            await response.read()
                        ok = response.status == 200
                except (aiohttp.ClientError, TimeoutError):
                    ok = False
                end = time.perf_counter()
                if not ok:
                    errors += 1
                    continue
                latencies.append(end - start)
                if first is not None:
                    ttfbs.append(first - start)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return Load(requests, errors, wall, latencies, ttfbs)


def async_load(url: str, bodies: Sequence[bytes], requests: int, concurrency: int, stream: bool) -> Load:
    """``requests`` POSTs cycling through ``bodies``; for streams, time to the first SSE event too."""
    import uvloop

    return uvloop.run(_async_load(url, bodies, requests, concurrency, stream))


def hey_available() -> bool:
    from shutil import which

    return which("hey") is not None and Path(which("hey") or "").exists()
