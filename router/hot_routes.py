"""The completion routes straight from ASGI, past FastAPI's routing and dependency machinery.

Per request, FastAPI's router, route matching, dependency solving and exception-stack middlewares cost about as
much CPU as everything the gateway itself does (measured in docs/benchmarks.md). This middleware answers a POST
to a hot path by calling its handler directly, the same handler FastAPI would call. The routes stay declared
in FastAPI too: they give the OpenAPI document, the 405 for other methods, and a slower but equal path when a
request's path does not match exactly (behind a ``root_path``, say).

It sits among the user middlewares, so FastAPI's outer ``ServerErrorMiddleware`` still turns an unexpected
exception into the gateway's OpenAI-shaped 500, and the API-key middleware, added after it, runs before it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from router.errors import RouterError
from router.http import error_response

Handler = Callable[[Request], Awaitable[Response]]


class HotRoutes:
    def __init__(self, app: ASGIApp, routes: Mapping[str, Handler]) -> None:
        self.app = app
        self.routes = dict(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler = self.routes.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if handler is None:
            await self.app(scope, receive, send)
            return
        try:
            response = await handler(Request(scope, receive, send))
        except RouterError as e:
            response = error_response(e)
        except ClientDisconnect:  # gone while sending its body: nobody to answer, nothing was forwarded
            return
        await response(scope, receive, send)
