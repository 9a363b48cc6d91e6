"""A fast fake OpenAI backend: a raw asyncio protocol on uvloop with httptools, so it is never the bottleneck.

``POST /v1/chat/completions`` and ``/v1/completions`` answer a fixed completion, as JSON or, when the body asks
for ``"stream": true``, as an SSE stream of ``--events`` chunks (plus a usage event when
``stream_options.include_usage`` is set) in chunked transfer encoding. ``GET /health`` and ``/v1/models`` answer
too. Run it with ``python -m loadtest.backend --port 9001``.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import httptools
import orjson
import uvloop

USAGE = {"prompt_tokens": 64, "completion_tokens": 16, "total_tokens": 80}


def _response(status: bytes, body: bytes, content_type: bytes = b"application/json") -> bytes:
    return (b"HTTP/1.1 " + status + b"\r\ncontent-type: " + content_type + b"\r\ncontent-length: "
            + str(len(body)).encode() + b"\r\nconnection: keep-alive\r\n\r\n" + body)


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


class Answers:
    """The prepared bytes of every answer (only the stream's usage event depends on the request)."""

    def __init__(self, events: int) -> None:
        created = int(time.time())
        words = [f"w{i} " for i in range(events)]
        message = {"role": "assistant", "content": "".join(words)}
        chat = {"id": "chatcmpl-fake", "object": "chat.completion", "created": created, "model": "fake",
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}], "usage": USAGE}
        self.chat = _response(b"200 OK", orjson.dumps(chat))
        text = {"id": "cmpl-fake", "object": "text_completion", "created": created, "model": "fake",
                "choices": [{"index": 0, "text": message["content"], "finish_reason": "stop"}], "usage": USAGE}
        self.text = _response(b"200 OK", orjson.dumps(text))
        self.health = _response(b"200 OK", b'{"ok":true}')
        self.models = _response(b"200 OK", b'{"object":"list","data":[{"id":"fake","object":"model"}]}')
        self.not_found = _response(b"404 Not Found", b'{"error":{"message":"not found","type":"not_found"}}')
        self.stream_head = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                            b"transfer-encoding: chunked\r\nconnection: keep-alive\r\n\r\n")
        base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": created, "model": "fake"}
        self.stream_events = [
            _chunk(b"data: " + orjson.dumps({**base, "choices": [
                {"index": 0, "delta": {"content": w}, "finish_reason": None}]}) + b"\n\n") for w in words
        ]
        self.stream_usage = _chunk(b"data: " + orjson.dumps({**base, "choices": [], "usage": USAGE}) + b"\n\n")
        self.stream_end = _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"


class Connection(asyncio.Protocol):
    def __init__(self, answers: Answers, event_delay_s: float) -> None:
        self.answers = answers
        self.event_delay_s = event_delay_s
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def on_message_begin(self) -> None:
        self.url, self.body = b"", []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        assert self.transport is not None
        a, path = self.answers, self.url.partition(b"?")[0]
        if path in (b"/v1/chat/completions", b"/v1/completions"):
            raw = b"".join(self.body)
            if b'"stream"' in raw and (doc := orjson.loads(raw)).get("stream"):
                usage = bool((doc.get("stream_options") or {}).get("include_usage"))
                if self.event_delay_s > 0:
                    asyncio.get_running_loop().create_task(self._stream_slowly(usage))
                else:
                    self.transport.write(b"".join([a.stream_head, *a.stream_events,
                                                   a.stream_usage if usage else b"", a.stream_end]))
                return
            self.transport.write(a.chat if path == b"/v1/chat/completions" else a.text)
        elif path == b"/health":
            self.transport.write(a.health)
        elif path == b"/v1/models":
            self.transport.write(a.models)
        else:
            self.transport.write(a.not_found)

    async def _stream_slowly(self, usage: bool) -> None:
        assert self.transport is not None
        a = self.answers
        self.transport.write(a.stream_head)
        for event in a.stream_events:
            if self.transport.is_closing():
                return
            self.transport.write(event)
            await asyncio.sleep(self.event_delay_s)
        self.transport.write((a.stream_usage if usage else b"") + a.stream_end)


async def serve(host: str, port: int, events: int, event_delay_s: float) -> None:
    answers = Answers(events)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Connection(answers, event_delay_s), host, port, backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.backend", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--events", type=int, default=16, help="content events per stream")
    parser.add_argument("--event-delay-ms", type=float, default=0.0, help="pause between stream events")
    args = parser.parse_args()
    uvloop.run(serve(args.host, args.port, args.events, args.event_delay_ms / 1000))


if __name__ == "__main__":
    main()
