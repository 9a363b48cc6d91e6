"""The floor: the barest useful pass-through proxy, FastAPI on uvicorn with an aiohttp client.

It reads the body, looks only at ``stream``, forwards the bytes unchanged to ``--upstream`` and relays the
answer (streams chunk by chunk). No validation, routing, metrics or failover: what any Python gateway of this
shape costs at least. Run it with ``python -m loadtest.proxy --port 9002 --upstream http://127.0.0.1:9001``.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import orjson
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse


def create_app(upstream: str) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=512, ttl_dns_cache=None)
        async with aiohttp.ClientSession(upstream, connector=connector) as session:
            app.state.session = session
            yield

    app = FastAPI(lifespan=lifespan)

    async def relay(response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        try:
            async for chunk in response.content.iter_any():
                yield chunk
        finally:
            response.release()

    async def forward(request: Request, path: str) -> Response:
        body = await request.body()
        session: aiohttp.ClientSession = request.app.state.session
        response = await session.post(path, data=body, headers={"content-type": "application/json"})
        if orjson.loads(body).get("stream") and response.status == 200:
            return StreamingResponse(relay(response), media_type=response.content_type)
        async with response:
            content = await response.read()
        return Response(content, status_code=response.status, media_type=response.content_type)

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
    parser.add_argument("--loop", default="uvloop", choices=["asyncio", "uvloop"])
    parser.add_argument("--http", default="httptools", choices=["h11", "httptools"])
    args = parser.parse_args()
    uvicorn.run(create_app(args.upstream), host=args.host, port=args.port, loop=args.loop, http=args.http,
                log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
