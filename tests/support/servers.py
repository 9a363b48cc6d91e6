"""Real HTTP servers on 127.0.0.1 for tests: any ASGI app under uvicorn in a thread, and a small
OpenAI-compatible backend that records what it received."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import orjson
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(app: Any, port: int | None = None, timeout_s: float = 30.0, **options: Any) -> Iterator[str]:
    """Run ``app`` on 127.0.0.1 until the block ends; yield its base URL. ``options`` go to uvicorn.Config; for a
    gateway, pass ``router.edge.server_options`` (its edge protocol and keep-alive: uvicorn's default keep-alive,
    5 s, equals httpx's pool expiry, and a client that reuses a connection just as the server closes it gets a
    ReadError, docs/reliability.md)."""
    port = port or free_port()
    options = {"timeout_keep_alive": 5.0, **options}
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on",
                                           **options))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"test server on port {port} did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout_s)


class FakeBackend:
    """An OpenAI-compatible backend that answers with a fixed text and remembers every request body."""

    USAGE: dict[str, int] = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}  # noqa: RUF012

    def __init__(self, name: str, text: str = "The answer is 42.", status: int = 200) -> None:
        self.name = name
        self.text = text
        self.status = status
        self.delay_s = 0.0  # before answering (a slow backend)
        self.chunk_delay_s = 0.0  # between stream chunks
        self.break_stream_after: int | None = None  # chunks sent before the stream is cut off
        self.received: list[dict[str, Any]] = []
        self.cancelled = 0  # requests abandoned by the gateway before they were answered
        self.app = self._build()

    def _build(self) -> FastAPI:
        app = FastAPI()

        async def answer(request: Request, kind: str) -> Response:
            body = orjson.loads(await request.body())
            self.received.append(body)
            if self.delay_s and await self._client_left_during(request, self.delay_s):
                self.cancelled += 1  # like vLLM: a request whose client left is aborted
                return Response(status_code=499)
            if self.status != 200:
                return JSONResponse({"error": {"message": "boom", "type": "server_error"}}, status_code=self.status)
            created = int(time.time())
            if body.get("stream"):
                return StreamingResponse(self._stream(body, kind, created), media_type="text/event-stream")
            if kind == "responses":
                return JSONResponse(self._response(body, f"resp_{self.name}_{len(self.received)}", created))
            if kind == "chat":
                choice = {"index": 0, "message": {"role": "assistant", "content": self.text}, "finish_reason": "stop"}
                obj = "chat.completion"
            else:
                choice = {"index": 0, "text": self.text, "finish_reason": "stop"}
                obj = "text_completion"
            return JSONResponse({"id": f"{kind}-{len(self.received)}", "object": obj, "created": created,
                                 "model": body["model"], "choices": [choice], "usage": self.USAGE})

        async def chat(request: Request) -> Response:
            return await answer(request, "chat")

        async def completions(request: Request) -> Response:
            return await answer(request, "text")

        async def responses(request: Request) -> Response:
            return await answer(request, "responses")

        async def models() -> dict[str, Any]:
            return {"object": "list", "data": [{"id": self.name, "object": "model"}]}

        app.add_api_route("/v1/chat/completions", chat, methods=["POST"])
        app.add_api_route("/v1/completions", completions, methods=["POST"])
        app.add_api_route("/v1/responses", responses, methods=["POST"])
        app.add_api_route("/v1/models", models, methods=["GET"])
        app.add_api_route("/health", lambda: {"ok": True}, methods=["GET"])
        return app

    @staticmethod
    async def _client_left_during(request: Request, seconds: float) -> bool:
        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        try:
            await asyncio.wait_for(disconnected(), seconds)
        except TimeoutError:
            return False
        return True

    async def _stream(self, body: dict[str, Any], kind: str, created: int):  # type: ignore[no-untyped-def]
        try:
            async for chunk in self._chunks(body, kind, created):
                yield chunk
        except (asyncio.CancelledError, GeneratorExit):  # the gateway went away mid-stream
            self.cancelled += 1
            raise

    def _response(self, body: dict[str, Any], rid: str, created: int, status: str = "completed") -> dict[str, Any]:
        """A Responses API response object, as vLLM writes it (the parts clients read)."""
        done = status != "in_progress"
        output = [{"type": "message", "id": f"msg_{rid}", "role": "assistant", "status": "completed",
                   "content": [{"type": "output_text", "text": self.text, "annotations": []}]}] if done else []
        usage = {"input_tokens": self.USAGE["prompt_tokens"], "output_tokens": self.USAGE["completion_tokens"],
                 "total_tokens": self.USAGE["total_tokens"]} if done else None
        return {"id": rid, "object": "response", "created_at": created, "model": body["model"], "status": status,
                "output": output, "usage": usage, "previous_response_id": None}

    async def _chunks(self, body: dict[str, Any], kind: str, created: int):  # type: ignore[no-untyped-def]
        if kind == "responses":
            async for event in self._response_events(body, created):
                yield event
            return
        for n, word in enumerate(self.text.split(" ")):
            if self.break_stream_after is not None and n == self.break_stream_after:
                raise RuntimeError("backend crashed mid-stream")  # uvicorn drops the connection
            if self.chunk_delay_s:
                await asyncio.sleep(self.chunk_delay_s)
            if kind == "chat":
                choice = {"index": 0, "delta": {"content": word + " "}, "finish_reason": None}
            else:
                choice = {"index": 0, "text": word + " ", "finish_reason": None}
            chunk = {"id": "s-1", "object": "chat.completion.chunk", "created": created, "model": body["model"],
                     "choices": [choice]}
            yield b"data: " + orjson.dumps(chunk) + b"\n\n"
            await asyncio.sleep(0)
        if (body.get("stream_options") or {}).get("include_usage"):
            chunk = {"id": "s-1", "object": "chat.completion.chunk", "created": created, "model": body["model"],
                     "choices": [], "usage": self.USAGE}
            yield b"data: " + orjson.dumps(chunk) + b"\n\n"
        yield b"data: [DONE]\n\n"

    async def _response_events(self, body: dict[str, Any], created: int):  # type: ignore[no-untyped-def]
        """A Responses stream as vLLM sends it: created, one delta per word, completed (usage in it); no [DONE]."""
        rid = f"resp_{self.name}_{len(self.received)}"

        def event(kind: str, doc: dict[str, Any]) -> bytes:
            return f"event: {kind}\ndata: ".encode() + orjson.dumps({**doc, "type": kind}) + b"\n\n"

        yield event("response.created", {"response": self._response(body, rid, created, "in_progress")})
        for n, word in enumerate(self.text.split(" ")):
            if self.break_stream_after is not None and n == self.break_stream_after:
                raise RuntimeError("backend crashed mid-stream")
            if self.chunk_delay_s:
                await asyncio.sleep(self.chunk_delay_s)
            yield event("response.output_text.delta", {"delta": word + " ", "output_index": 0, "content_index": 0})
            await asyncio.sleep(0)
        yield event("response.completed", {"response": self._response(body, rid, created)})
