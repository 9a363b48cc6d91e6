"""The HTTP edge's side of an answer: errors as OpenAI-shaped responses, relayed streams, cancellation.

This is the one place where a domain error (``router.errors``) becomes an HTTP status and body
(``error_response``), used by the app's exception handlers, the hot routes and the edge middlewares alike; and
where the gateway's ``Reply`` becomes a Starlette response (``to_response``), a relayed stream bounded on the
client's side (``RelayResponse``). ``unless_client_leaves`` cancels a handler whose client has gone.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Coroutine
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response, StreamingResponse
from starlette.types import Message as ASGIMessage
from starlette.types import Receive, Scope, Send

from router.errors import (
    AuthenticationFailed,
    HTTPRefusal,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    RateLimited,
    RouterError,
    TooLarge,
    Unavailable,
    UpstreamFailed,
)
from router.upstream import Reply

log = logging.getLogger(__name__)

CANCEL_ON_DISCONNECT = "router.cancel_on_disconnect"
"""ASGI scope key: the task that the edge cancels if the request's client disconnects before its answer is
complete (set while the work is pointless without the client, removed after: the completion handler while it
waits on the backend, ``unless_client_leaves``; a relayed stream, ``RelayResponse``)."""
CLIENT_GONE = "router.client_gone"
"""ASGI scope key, set by the edge to True once the request's client has disconnected before its answer was sent."""

STATUS: dict[type[RouterError], int] = {
    InvalidRequest: 400,
    AuthenticationFailed: 401,
    PermissionDenied: 403,
    NotFound: 404,
    TooLarge: 413,
    RateLimited: 429,
    UpstreamFailed: 502,
    Unavailable: 503,
}
"""Each domain error's HTTP status (a subclass takes its nearest listed ancestor's)."""

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    414: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}


def status_of(error: RouterError) -> int:
    if isinstance(error, HTTPRefusal):
        return error.status
    for kind in type(error).__mro__:
        if kind in STATUS:
            return STATUS[kind]  # type: ignore[index]
    return 500


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def plain_error(status: int, message: str, param: str | None = None, code: str | None = None,
                headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(error_body(status, message, param, code)), status_code=status,
                    media_type="application/json", headers=headers)


def error_response(error: RouterError) -> Response:
    """The HTTP answer to a domain error: its status, OpenAI's error body, and its headers (a wait to retry)."""
    headers = dict(error.headers)
    if isinstance(error, RateLimited) and error.retry_after_s is not None:
        headers["retry-after"] = str(max(1, math.ceil(error.retry_after_s)))
    if isinstance(error, AuthenticationFailed):
        headers.setdefault("www-authenticate", "Bearer")
    return plain_error(status_of(error), error.message, error.param, error.code, headers)


def install_error_handlers(app: FastAPI) -> None:
    async def on_router_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, RouterError)
        return error_response(exc)

    async def on_http_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        return plain_error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    async def on_validation_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(p) for p in first["loc"] if p != "body") or None
        return plain_error(400, f"{param or 'request'}: {first['msg']}", param, "invalid_value")

    async def on_unexpected(_: Request, exc: Exception) -> Response:
        log.exception("unhandled error", exc_info=exc)
        return plain_error(500, "internal error in the gateway; the request was not forwarded")

    app.add_exception_handler(RouterError, on_router_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(Exception, on_unexpected)


async def unless_client_leaves(request: Request, work: Coroutine[Any, Any, Response]) -> Response:
    """Await ``work``; if the client disconnects first, cancel it (which closes the upstream request, so the
    backend stops generating). The edge (router/edge.py) cancels this task when the connection is lost: a
    request costs two dict entries, not a watcher task of its own."""
    scope = request.scope
    if scope.get(CLIENT_GONE):  # gone already (while its key's budget was checked, say)
        work.close()
        return Response(status_code=499)
    handler = asyncio.current_task()
    assert handler is not None
    scope[CANCEL_ON_DISCONNECT] = handler
    try:
        return await work
    except asyncio.CancelledError:
        if not scope.get(CLIENT_GONE):
            raise
        handler.uncancel()
        return Response(status_code=499)  # nobody is listening; the status is for the access log
    finally:
        scope.pop(CANCEL_ON_DISCONNECT, None)


def to_response(reply: Reply, send_timeout_s: float) -> Response:
    """The gateway's answer as a Starlette response: the body as it is, or the stream relayed."""
    if reply.stream is None:
        return Response(reply.body, status_code=reply.status, media_type=reply.media_type, headers=reply.headers)
    return RelayResponse(reply, send_timeout_s=send_timeout_s)


class RelayResponse(StreamingResponse):
    """A relayed stream bounded on the client's side: a client that takes none of it for ``send_timeout_s``, or
    whose answer is still going at the reply's deadline (monotonic), is cut off, and the upstream request is
    closed. That is the client's doing or the request's limit, so the backend's breaker never hears of it. A client
    that disconnects is seen by the edge (router/edge.py), which cancels this task: no second task per stream
    waiting for the disconnect (Starlette's StreamingResponse starts one under uvicorn, whose protocols speak
    ASGI 2.3)."""

    def __init__(self, reply: Reply, *, send_timeout_s: float) -> None:
        assert reply.stream is not None
        super().__init__(reply.stream, status_code=reply.status, media_type=reply.media_type, headers=reply.headers)
        self.relay = reply.stream
        self.deadline = reply.deadline
        self.send_timeout_s = send_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # One watchdog timer per stream, not one per chunk: it looks at the send in progress every
        # send_timeout_s (or at the deadline) and cancels this task if the client has stalled it.
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        deadline = loop.time() + max(self.deadline - time.monotonic(), 0.0)
        sending_since: float | None = None
        cut = False

        async def watched_send(message: ASGIMessage) -> None:
            nonlocal sending_since
            sending_since = loop.time()
            try:
                await send(message)
            finally:
                sending_since = None

        def watch() -> None:
            nonlocal timer, cut
            now = loop.time()
            if now >= deadline or (sending_since is not None and now - sending_since >= self.send_timeout_s):
                cut = True
                task.cancel()
                return
            due = now + self.send_timeout_s if sending_since is None else sending_since + self.send_timeout_s
            timer = loop.call_at(min(due, deadline), watch)

        timer = loop.call_at(min(loop.time() + self.send_timeout_s, deadline), watch)
        scope[CANCEL_ON_DISCONNECT] = task
        try:
            if not scope.get(CLIENT_GONE):  # gone already: nothing to relay
                await self.stream_response(watched_send)
        except asyncio.CancelledError:
            if not (cut or scope.get(CLIENT_GONE)):
                raise
            task.uncancel()
            if cut:
                log.info("stream cut off: its client read too slowly or it ran past its deadline")
        finally:
            scope.pop(CANCEL_ON_DISCONNECT, None)
            timer.cancel()
            await self.relay.aclose()  # a relay never started still closes its upstream and is counted
        if self.background is not None:
            await self.background()
