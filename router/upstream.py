"""The backend pool: one HTTP client per backend, forwarding, and relaying streams as bytes.

The client is aiohttp: under concurrency its connection pool costs a fraction of httpx's (see
docs/benchmarks.md), and the gateway's throughput is bounded by it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import aiohttp
from multidict import CIMultiDictProxy

from router.breaker import Breaker, State
from router.config import BackendConfig, ResilienceConfig

log = logging.getLogger(__name__)
T = TypeVar("T")


class Deadlines:
    """Waits bounded by deadlines, all checked by one timer armed for the earliest, instead of a timer per wait
    (``asyncio.timeout`` costs about 6 us of CPU per use: an object, a timer armed and cancelled). A deadline
    later than the armed one, the usual case, costs two dict entries. The timer, when it fires, cancels the
    waits that are past their deadlines and is armed again for the earliest one left."""

    def __init__(self) -> None:
        self._due: dict[asyncio.Task[Any], float] = {}
        self._expired: set[asyncio.Task[Any]] = set()
        self._timer: asyncio.TimerHandle | None = None

    async def within(self, seconds: float, awaitable: Awaitable[T]) -> T:
        """Await ``awaitable``; TimeoutError if it has not finished within ``seconds``, as asyncio.timeout."""
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        when = loop.time() + seconds
        cancelling = task.cancelling()
        self._due[task] = when
        if self._timer is None or when < self._timer.when():
            if self._timer is not None:
                self._timer.cancel()
            self._timer = loop.call_at(when, self._expire, loop)
        try:
            return await awaitable
        except asyncio.CancelledError:
            if task in self._expired and task.uncancel() <= cancelling:  # ours alone, not also the caller's
                raise TimeoutError from None
            raise
        finally:
            self._due.pop(task, None)
            self._expired.discard(task)

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        now = loop.time()
        earliest = None
        for task, when in list(self._due.items()):
            if when <= now:
                del self._due[task]
                self._expired.add(task)
                task.cancel()
            elif earliest is None or when < earliest:
                earliest = when
        if earliest is not None:
            self._timer = loop.call_at(earliest, self._expire, loop)


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @classmethod
    def from_json(cls, usage: object) -> Usage | None:
        if not isinstance(usage, dict):
            return None
        return cls(int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))


class UpstreamUnreachable(Exception):
    """No response at all: the connection was refused, failed, or timed out before any byte came back.

    Its message, which clients see in a 502, names the backend and what happened, never the backend's address:
    the detail (aiohttp's error, with host and port) goes to the log only."""

    MESSAGES = {"timeout": "no response in time", "connect": "could not connect"}  # noqa: RUF012

    def __init__(self, backend: str, kind: str, detail: str) -> None:
        super().__init__(f"backend {backend}: {self.MESSAGES.get(kind, kind)}")
        self.backend = backend
        self.kind = kind
        log.warning("backend %s: %s: %s", backend, kind, detail)


class UpstreamBroken(Exception):
    """The backend's answer broke off after its status line; the message names what broke."""


class UpstreamResponse:
    """A backend's answer whose status and headers are in and whose body is not read yet."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status_code = response.status
        self.headers: CIMultiDictProxy[str] = response.headers

    async def aread(self) -> bytes:
        try:
            return await self._response.read()
        except aiohttp.ClientError as e:
            raise UpstreamBroken(type(e).__name__) from e

    async def next_chunk(self) -> bytes:
        """The body's next bytes as they arrive; b"" at its end."""
        try:
            return await self._response.content.readany()
        except aiohttp.ClientError as e:
            raise UpstreamBroken(type(e).__name__) from e

    async def aclose(self) -> None:
        """Give the connection back when the body was read to its end; otherwise close it (the backend sees
        the request go away and stops generating)."""
        if self._response.content.at_eof():
            self._response.release()
        else:
            self._response.close()


class Backend:
    def __init__(self, cfg: BackendConfig, resilience: ResilienceConfig) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.breaker = Breaker(resilience.failure_threshold, resilience.cooldown_s)
        base = str(cfg.base_url).rstrip("/")
        self.base_url = base + "/"
        url = aiohttp.client.URL(base)
        self.health_url = str(url.with_path(cfg.health_path).with_query(None))
        # identity: bodies pass through as the backend sent them, never decompressed and re-encoded
        self.headers = {"content-type": "application/json", "accept-encoding": "identity"}
        if (key := cfg.api_key()) is not None:
            self.headers["authorization"] = f"Bearer {key}"
        # Waits for the first byte and between chunks are bounded by the caller (see open() and relay_stream),
        # because a non-streamed answer sends nothing until it is complete. ``connect`` covers waiting for a
        # pooled connection as well as opening one.
        self.timeout = aiohttp.ClientTimeout(total=None, connect=cfg.connect_timeout_s, sock_read=None)
        self._session: aiohttp.ClientSession | None = None
        self._health_session: aiohttp.ClientSession | None = None
        self.deadlines = Deadlines()  # the first byte of each request, the gap before each chunk of a stream

    @property
    def session(self) -> aiohttp.ClientSession:
        """Made on first use, inside the running event loop (aiohttp binds a session to its loop)."""
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self.cfg.max_connections, limit_per_host=0)
            self._session = aiohttp.ClientSession(connector=connector, timeout=self.timeout, headers=self.headers,
                                                  auto_decompress=False)
        return self._session

    @property
    def health_session(self) -> aiohttp.ClientSession:
        """Health checks' own small pool: a full request pool (held streams, say) must not fail them."""
        if self._health_session is None:
            connector = aiohttp.TCPConnector(limit=2, limit_per_host=0)
            self._health_session = aiohttp.ClientSession(connector=connector, headers=self.headers)
        return self._health_session

    async def open(self, path: str, body: bytes, timeout_s: float) -> UpstreamResponse:
        """POST ``body`` to ``path``; return once the status and headers are in, with the body unread."""
        self.breaker.begin()
        try:
            response = await self.deadlines.within(
                min(timeout_s, self.cfg.first_byte_timeout_s),
                self.session.post(self.base_url + path, data=body, allow_redirects=False))
        except TimeoutError as e:  # aiohttp's own timeouts are TimeoutErrors too
            self.breaker.failure()
            raise UpstreamUnreachable(self.name, "timeout", repr(e) if str(e) else "no response in time") from e
        except aiohttp.ClientError as e:
            self.breaker.failure()
            raise UpstreamUnreachable(self.name, "connect", repr(e)) from e
        if response.status >= 500:
            self.breaker.failure()
        else:
            self.breaker.success()
        return UpstreamResponse(response)

    async def check_health(self, timeout_s: float) -> bool:
        """One active health check; its result feeds the breaker."""
        return await check_health(self.health_session, self.health_url, self.breaker, timeout_s)

    async def aclose(self) -> None:
        for session in (self._session, self._health_session):
            if session is not None:
                await session.close()


async def check_health(session: aiohttp.ClientSession, url: str, breaker: Breaker, timeout_s: float) -> bool:
    """GET ``url``: 200 in time passes (an open circuit may try one request now), anything else is a failure."""
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s), allow_redirects=False) as r:
            ok = r.status == 200
    except (aiohttp.ClientError, TimeoutError):
        ok = False
    if ok:
        breaker.healthy()
    else:
        breaker.failure()
    return ok


class Pool:
    def __init__(self, configs: list[BackendConfig], resilience: ResilienceConfig) -> None:
        self.backends = {c.name: Backend(c, resilience) for c in configs}
        self.resilience = resilience

    def __getitem__(self, name: str) -> Backend:
        return self.backends[name]

    def available(self) -> set[str]:
        return {name for name, b in self.backends.items() if b.breaker.available()}

    def states(self) -> dict[str, State]:
        return {name: b.breaker.current for name, b in self.backends.items()}

    async def check_all(self) -> dict[str, bool]:
        names = list(self.backends)
        timeout = self.resilience.health_timeout_s
        results = await asyncio.gather(*(self.backends[n].check_health(timeout) for n in names))
        return dict(zip(names, results, strict=True))

    async def run_health_checks(self) -> None:
        """Check every backend forever, every ``health_interval_s`` (cancel the task to stop)."""
        while True:
            await asyncio.sleep(self.resilience.health_interval_s)  # backends start out trusted
            try:
                await self.check_all()
            except Exception:  # a bug here must not end the checks
                log.exception("health check round failed")

    async def aclose(self) -> None:
        await asyncio.gather(*(b.aclose() for b in self.backends.values()))


@dataclass
class Outcome:
    """What the gateway learns from one answer: usage, the answer's id, whether it ended well, and (Responses API)
    the final response object."""

    usage: Usage | None = None
    completion_id: str | None = None  # the completion's id (chat, text) or the response's id (Responses API)
    ok: bool = False
    error: str | None = None
    response: dict[str, Any] | None = field(default=None, repr=False)


class StreamReader(Protocol):
    """What one relayed stream is read by (its API's reader: router/protocols.py)."""

    def feed(self, event: bytes) -> bool:
        """Read one complete SSE event (without its blank line); whether to pass it on to the client."""
        ...

    def outcome(self) -> Outcome:
        """What the events read so far say (usage, id, final response); ``ok`` and ``error`` are the relay's."""
        ...

    def error_event(self, message: str) -> bytes:
        """The event that ends a stream broken off mid-way, in the API's own form."""
        ...

    @property
    def finished(self) -> bool:
        """Whether the events read so far hold the whole answer (the Responses API's terminal event; never for
        chat, whose relay needs no such moment)."""
        ...


class Relay:
    """An answer's stream as the edge iterates it. Closing it before its first chunk was asked for (the client
    went away meanwhile) still closes the upstream response and reports the outcome, which an async generator
    never started would not do."""

    def __init__(self, chunks: AsyncGenerator[bytes, None], abandon: Callable[[], Awaitable[None]]) -> None:
        self._chunks = chunks
        self._abandon = abandon
        self._started = False
        self._closed = False

    def __aiter__(self) -> Relay:
        return self

    async def __anext__(self) -> bytes:
        self._started = True
        return await self._chunks.__anext__()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._started:
            await self._chunks.aclose()
        else:
            await self._abandon()


@dataclass
class Reply:
    """The gateway's answer to one request, before it is an HTTP response: a body, or a relayed stream."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    media_type: str = "application/json"
    body: bytes = b""
    stream: Relay | None = None
    deadline: float = 0.0  # monotonic: a stream still going then is cut off


def relay_stream(
    response: UpstreamResponse,
    backend: Backend,
    *,
    reader: StreamReader,
    deadline: float,
    on_first_byte: Callable[[], None],
    on_done: Callable[[Outcome], None],
    on_finished: Callable[[Outcome], Awaitable[None]] | None = None,
) -> Relay:
    """Pass an SSE stream through event by event, unchanged, each read by ``reader`` (which may hold one back:
    chat's usage-only event when the gateway asked for it and the client did not). A backend that breaks off,
    stalls longer than its ``read_timeout_s`` or passes ``deadline`` (monotonic) ends the stream with the reader's
    error event (in its API's form); only the first two count against its breaker. ``on_done``
    runs exactly once, also when the client goes away and the stream is cancelled or never started (which closes
    the upstream request, so the backend stops generating). ``on_finished``, if given, runs once when ``reader``
    first holds the whole answer, and is awaited (shielded from the client leaving) before the bytes that finished
    it go out: what it records is there before the client can act on the answer, and is not lost if it leaves.
    """

    async def abandon() -> None:
        await response.aclose()
        on_done(Outcome(error="the client went away before the stream started"))

    return Relay(_relay(response, backend, reader, deadline, on_first_byte, on_done, on_finished), abandon)


async def _relay(
    response: UpstreamResponse, backend: Backend, reader: StreamReader, deadline: float,
    on_first_byte: Callable[[], None], on_done: Callable[[Outcome], None],
    on_finished: Callable[[Outcome], Awaitable[None]] | None,
) -> AsyncGenerator[bytes, None]:
    ok, error = False, None
    pending = b""
    first = True
    stall = backend.cfg.read_timeout_s
    left = deadline - time.monotonic()
    try:
        while True:
            left = deadline - time.monotonic()
            chunk = await backend.deadlines.within(max(min(stall, left), 0.0), response.next_chunk())
            if not chunk:
                break
            if first:
                on_first_byte()
                first = False
            pending += chunk
            *events, pending = pending.split(b"\n\n")
            out = [event + b"\n\n" for event in events if reader.feed(event)]
            if on_finished is not None and reader.finished:
                await asyncio.shield(on_finished(reader.outcome()))
                on_finished = None
            if out:
                yield b"".join(out)
        if pending.strip() and reader.feed(pending.rstrip(b"\n")):
            if on_finished is not None and reader.finished:
                await asyncio.shield(on_finished(reader.outcome()))
            yield pending
        ok = True
    except TimeoutError:
        if left < stall:  # the request's own deadline (its client may have been reading slowly): not the backend's
            error = f"the answer of backend {backend.name} ran past the request's deadline"
        else:
            error = f"backend {backend.name} sent nothing for {stall:g}s"
            backend.breaker.failure()
    except UpstreamBroken as e:
        error = f"backend {backend.name}'s stream broke off: {e}"
        backend.breaker.failure()
    finally:
        if error is not None:
            log.warning("%s", error)
        await response.aclose()
        outcome = reader.outcome()
        outcome.ok, outcome.error = ok, error
        on_done(outcome)
    if error is not None:
        yield reader.error_event(error)
