"""The floor: the barest useful pass-through proxy, FastAPI on uvicorn with an async HTTP client.

It reads the body, looks only at ``stream``, forwards the bytes unchanged to ``--upstream`` and relays the
answer (streams chunk by chunk). No validation, routing, metrics or failover: what any Python gateway of this
shape costs at least. ``--client`` picks the upstream client, so the benchmark can compare them on equal terms:
``aiohttp`` (the floor, and what the gateway uses), ``httpx`` (its default transport) and ``httpx-aiohttp``
(httpx's API over aiohttp's connection pool, the ``httpx-aiohttp`` package). Run it with
``python -m loadtest.proxy --port 9002 --upstream http://127.0.0.1:9001``.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager

import aiohttp
import httpx
import orjson
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

CLIENTS = ("aiohttp", "httpx", "httpx-aiohttp")
MAX_CONNECTIONS = 512
Forward = Callable[[str, bytes, bool], Awaitable[Response]]


async def _aiohttp_forwarder(upstream: str, stack: AsyncExitStack) -> Forward:
    connector = aiohttp.TCPConnector(limit=MAX_CONNECTIONS, ttl_dns_cache=None)
    session = await stack.enter_async_context(aiohttp.ClientSession(upstream, connector=connector))

    async def relay(response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        try:
            async for chunk in response.content.iter_any():
                yield chunk
        finally:
            response.release()

    async def forward(path: str, body: bytes, stream: bool) -> Response:
        response = await session.post(path, data=body, headers={"content-type": "application/json"})
        if stream and response.status == 200:
            return StreamingResponse(relay(response), media_type=response.content_type)
        async with response:
            content = await response.read()
        return Response(content, status_code=response.status, media_type=response.content_type)

    return forward


async def _httpx_forwarder(upstream: str, stack: AsyncExitStack, over_aiohttp: bool) -> Forward:
    limits = httpx.Limits(max_connections=MAX_CONNECTIONS, max_keepalive_connections=MAX_CONNECTIONS)
    if over_aiohttp:
        from httpx_aiohttp import AiohttpTransport

        transport: httpx.AsyncBaseTransport = AiohttpTransport(limits=limits)
    else:
        transport = httpx.AsyncHTTPTransport(limits=limits)
    client = await stack.enter_async_context(httpx.AsyncClient(base_url=upstream, transport=transport,
                                                               timeout=None))

    async def relay(response: httpx.Response) -> AsyncIterator[bytes]:
        try:
            async for chunk in response.aiter_raw():
                yield chunk
        finally:
            await response.aclose()

    async def forward(path: str, body: bytes, stream: bool) -> Response:
        request = client.build_request("POST", path, content=body, headers={"content-type": "application/json"})
        response = await client.send(request, stream=True)
        media = response.headers.get("content-type")
        if stream and response.status_code == 200:
            return StreamingResponse(relay(response), media_type=media)
        try:
            content = await response.aread()
        finally:
            await response.aclose()
        return Response(content, status_code=response.status_code, media_type=media)

    return forward


def create_app(upstream: str, client: str = "aiohttp") -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            if client == "aiohttp":
                app.state.forward = await _aiohttp_forwarder(upstream, stack)
            else:
                app.state.forward = await _httpx_forwarder(upstream, stack, over_aiohttp=client == "httpx-aiohttp")
            yield

    app = FastAPI(lifespan=lifespan)

    async def forward(request: Request, path: str) -> Response:
        body = await request.body()
        return await request.app.state.forward(path, body, bool(orjson.loads(body).get("stream")))

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await forward(request, "/v1/chat/completions")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await forward(request, "/v1/completions")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.proxy", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="the backend's origin, e.g. http://127.0.0.1:9001")
    parser.add_argument("--client", default="aiohttp", choices=CLIENTS)
    parser.add_argument("--loop", default="uvloop", choices=["asyncio", "uvloop"])
    parser.add_argument("--http", default="httptools", choices=["h11", "httptools"])
    args = parser.parse_args()
    uvicorn.run(create_app(args.upstream, args.client), host=args.host, port=args.port, loop=args.loop,
                http=args.http, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
