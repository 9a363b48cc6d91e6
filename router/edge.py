"""The HTTP edge: uvicorn's httptools protocol with the limits it lacks, enforced before the app (and any key
check) sees a request.

uvicorn with httptools bounds neither the size nor the number of header fields (httptools concatenates a header
value piece by piece, so one 128 MB value costs seconds of CPU), has no timeout for a head or a body that is
sent slowly, none for a new connection that sends nothing, and no cap on open connections (its
``limit_concurrency`` answers 503 but keeps the connection). uvicorn's h11 protocol bounds the head
(``h11_max_incomplete_event_size``) but nothing else, and costs the hot path much more CPU. So this thin subclass
of the fast protocol adds, per connection:

- the head (request line and headers) at most ``max_header_bytes`` and ``max_headers`` fields: else 431; a
  request line over ``max_request_line_bytes``: 414. Counted as bytes arrive, so memory stays bounded;
- ``header_timeout_s`` from a connection's start (or a request's first byte) to the end of its head, and
  ``body_timeout_s`` from the head to the end of the body: else 408 and the connection closes;
- at most ``max_connections`` open connections: one more is closed at once;
- a handler waiting on work its client no longer wants is cancelled when the connection is lost
  (``CANCEL_ON_DISCONNECT``): one dict entry per request instead of a watcher task;
- an answer's head and body, which uvicorn writes separately, go to the socket as one write
  (``CoalescedWrites``): one send() and one packet for the client to read instead of two.
The idle keep-alive timeout is uvicorn's own (``keep_alive_s``). See docs/security.md for the defaults beside
Envoy's and nginx's.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import resource
from collections.abc import Callable
from typing import Any

import httptools
import orjson
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from router.config import ServerConfig
from router.http import CANCEL_ON_DISCONNECT, CLIENT_GONE, error_body

log = logging.getLogger(__name__)

class _Refuse(Exception):
    """Raised in a parser callback to refuse the request (the parser stops at once)."""

    def __init__(self, status: int, reason: bytes, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


def _plain_response(status: int, reason: bytes, message: str) -> bytes:
    """A whole HTTP/1.1 answer written straight to the socket (no app runs for a refused request)."""
    body = orjson.dumps(error_body(status, message))
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
            % (status, reason, len(body))) + body


class CoalescedWrites:
    """A connection's transport as uvicorn's request cycles see it: what they write in one turn of the event loop
    goes to the socket as one write at the end of that turn. uvicorn writes an answer's head and its body (and
    each chunk of a stream) with a transport.write() each, and each is a send() to the socket at once."""

    __slots__ = ("_held", "loop", "transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self.transport = transport
        self.loop = loop
        self._held: list[bytes] | None = None

    def write(self, data: bytes) -> None:
        if self._held is None:
            self._held = [data]
            self.loop.call_soon(self.flush)
        else:
            self._held.append(data)

    def flush(self) -> None:
        held, self._held = self._held, None
        if held and not self.transport.is_closing():
            self.transport.write(held[0] if len(held) == 1 else b"".join(held))

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def is_closing(self) -> bool:
        return self.transport.is_closing()


class EdgeProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` with bounded heads, head and body timeouts and a connection cap (see the module)."""

    def __init__(self, *args: Any, limits: ServerConfig, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self._in_head = True  # reading a request's head (or waiting for one to start)
        self._begun_in_chunk = False
        self._head_bytes = 0  # counted exactly, from the parser's callbacks
        self._head_raw = 0  # chunks that arrived while a head was incomplete
        self._header_count = 0
        self._timer: asyncio.TimerHandle | None = None
        self._deadline: float | None = None
        self._on_deadline: Callable[[], None] = self._head_timed_out
        self._writes: CoalescedWrites | None = None

    # connection life
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.limits.max_connections:
            log.warning("connection refused: %d open connections (server.max_connections)", len(self.connections))
            transport.abort()
            return
        super().connection_made(transport)
        self._writes = CoalescedWrites(transport, self.loop)
        self._arm(self.limits.header_timeout_s, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._timer is not None:
            self._timer.cancel()
        if self.transport is None:  # refused in connection_made, never counted
            return
        cycle = self.cycle
        super().connection_lost(exc)
        if cycle is not None and cycle.disconnected:  # gone before its answer was complete
            cycle.scope[CLIENT_GONE] = True  # type: ignore[index]
            task = cycle.scope.pop(CANCEL_ON_DISCONNECT, None)  # type: ignore[misc]
            if task is not None:
                task.cancel()

    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        self._begun_in_chunk = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as e:
            if isinstance(e.__context__, _Refuse):
                self._refuse(e.__context__)
                return
            self._bad_request()
            return
        except httptools.HttpParserError:
            self._bad_request()
            return
        except httptools.HttpParserUpgrade:
            self._unsupported_upgrade_warning()
            return
        if self._in_head and not self._begun_in_chunk:
            # The whole chunk belongs to a head still incomplete (the parser holds a partial header we cannot see).
            self._head_raw += len(data)
            if self._head_raw > self.limits.max_header_bytes:
                self._refuse(_Refuse(431, b"Request Header Fields Too Large",
                                     f"request headers are larger than {self.limits.max_header_bytes} bytes"))

    # parser callbacks
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._begun_in_chunk = True
        self._head_bytes = self._head_raw = self._header_count = 0
        self._arm(self.limits.header_timeout_s, self._head_timed_out)

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > self.limits.max_request_line_bytes:
            raise _Refuse(414, b"URI Too Long", f"request line longer than {self.limits.max_request_line_bytes} bytes")
        self._head_bytes += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        self._head_bytes += len(name) + len(value) + 4
        if self._header_count > self.limits.max_headers:
            raise _Refuse(431, b"Request Header Fields Too Large",
                          f"more than {self.limits.max_headers} header fields")
        if self._head_bytes > self.limits.max_header_bytes:
            raise _Refuse(431, b"Request Header Fields Too Large",
                          f"request headers are larger than {self.limits.max_header_bytes} bytes")
        name = name.lower()  # the rest is uvicorn's on_header, inlined: this runs for every header
        if name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._arm(self.limits.body_timeout_s, self._body_timed_out)
        super().on_headers_complete()
        self.cycle.transport = self._writes  # type: ignore[assignment]  # its answer's writes, coalesced

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    # limits: one deadline per connection (the head's or the body's), checked by a timer that is re-armed only
    # when it fires early, so a request costs no timer of its own
    def _arm(self, seconds: float, handler: Callable[[], None]) -> None:
        self._deadline = self.loop.time() + seconds
        self._on_deadline = handler
        if self._timer is None or self._timer.when() > self._deadline:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self.loop.call_at(self._deadline, self._check_deadline)

    def _disarm(self) -> None:
        self._deadline = None

    def _check_deadline(self) -> None:
        self._timer = None
        if self._deadline is None or self.transport.is_closing():
            return
        if self.loop.time() < self._deadline:
            self._timer = self.loop.call_at(self._deadline, self._check_deadline)
            return
        self._deadline = None
        self._on_deadline()

    def _head_timed_out(self) -> None:
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a request is still being answered (its next request's head has not started)
        self._close_with(_plain_response(408, b"Request Timeout", "request head not received in time"))

    def _body_timed_out(self) -> None:
        if self.cycle is None:
            return
        if self.cycle.response_started:  # the app answered without reading the whole body: it is done with it
            return
        self.cycle.disconnected = True  # the app's receive() sees a disconnect and sends nothing more
        self.cycle.message_event.set()
        self._close_with(_plain_response(408, b"Request Timeout", "request body not received in time"))

    def _refuse(self, refusal: _Refuse) -> None:
        log.info("request refused at the edge: %s", refusal)
        self._close_with(_plain_response(refusal.status, refusal.reason, str(refusal)))

    def _bad_request(self) -> None:
        self._close_with(_plain_response(400, b"Bad Request", "invalid HTTP request"))

    def _close_with(self, response: bytes) -> None:
        self._disarm()
        if self._writes is not None:
            self._writes.flush()  # what an earlier answer wrote goes first
        self.transport.write(response)
        self.transport.close()


def raise_open_file_limit() -> int:
    """Raise this process's soft open-file limit to its hard limit (many distros start at 1,024); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def server_options(server: ServerConfig) -> dict[str, Any]:
    """uvicorn.Config keyword arguments for the gateway's listener: the edge protocol and its limits."""
    return {
        "http": functools.partial(EdgeProtocol, limits=server),
        "timeout_keep_alive": server.keep_alive_s,
        "timeout_graceful_shutdown": server.shutdown_timeout_s,
        "ws": "none",
    }


def server_config(app: Any, server: ServerConfig, host: str, port: int, log_level: str) -> uvicorn.Config:
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, **server_options(server))
