"""The backend pool: one HTTP client per backend, forwarding, and relaying streams as bytes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import httpx
import orjson

from router.config import BackendConfig

log = logging.getLogger(__name__)


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
    """No response at all: the connection was refused, failed, or timed out before any byte came back."""

    def __init__(self, backend: str, kind: str, detail: str) -> None:
        super().__init__(f"backend {backend}: {kind}: {detail}")
        self.backend = backend
        self.kind = kind


class Backend:
    def __init__(self, cfg: BackendConfig, max_connections: int = 256) -> None:
        self.cfg = cfg
        self.name = cfg.name
        headers = {"content-type": "application/json"}
        if (key := cfg.api_key()) is not None:
            headers["authorization"] = f"Bearer {key}"
        self.client = httpx.AsyncClient(
            base_url=str(cfg.base_url),
            headers=headers,
            timeout=httpx.Timeout(connect=cfg.connect_timeout_s, read=cfg.read_timeout_s, write=30.0, pool=30.0),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )

    async def open(self, path: str, body: bytes) -> httpx.Response:
        """POST ``body`` to ``path`` and return the response with its body still unread."""
        request = self.client.build_request("POST", path, content=body)
        try:
            return await self.client.send(request, stream=True)
        except httpx.TimeoutException as e:
            raise UpstreamUnreachable(self.name, "timeout", repr(e)) from e
        except httpx.TransportError as e:
            raise UpstreamUnreachable(self.name, "connect", repr(e)) from e

    async def reachable(self, timeout_s: float = 2.0) -> bool:
        try:
            r = await self.client.get("models", timeout=timeout_s)
        except httpx.HTTPError:
            return False
        return r.status_code < 500

    async def aclose(self) -> None:
        await self.client.aclose()


class Pool:
    def __init__(self, configs: list[BackendConfig]) -> None:
        self.backends = {c.name: Backend(c) for c in configs}

    def __getitem__(self, name: str) -> Backend:
        return self.backends[name]

    async def reachable(self) -> dict[str, bool]:
        names = list(self.backends)
        states = await asyncio.gather(*(self.backends[n].reachable() for n in names))
        return dict(zip(names, states, strict=True))

    async def aclose(self) -> None:
        await asyncio.gather(*(b.aclose() for b in self.backends.values()))


def usage_of_body(content: bytes) -> Usage | None:
    try:
        doc = orjson.loads(content)
    except orjson.JSONDecodeError:
        return None
    return Usage.from_json(doc.get("usage")) if isinstance(doc, dict) else None


def _usage_event(event: bytes) -> tuple[Usage | None, bool]:
    """(usage carried by this SSE event, whether the event is only a usage report with no choices)."""
    if b'"usage"' not in event:
        return None, False
    payload = event.partition(b"data:")[2].strip()
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None, False
    if not isinstance(doc, dict):
        return None, False
    usage = Usage.from_json(doc.get("usage"))
    return usage, usage is not None and not doc.get("choices")


def stream_error_event(message: str) -> bytes:
    body = {"error": {"message": message, "type": "upstream_error", "param": None, "code": "stream_interrupted"}}
    return b"data: " + orjson.dumps(body) + b"\n\n"


async def relay_stream(
    response: httpx.Response,
    *,
    drop_usage_event: bool,
    on_first_byte: Callable[[], None],
    on_done: Callable[[Usage | None, bool], None],
) -> AsyncIterator[bytes]:
    """Pass an SSE stream through event by event, unchanged, reading only the usage report.

    ``drop_usage_event`` removes the usage-only event when the gateway asked for it and the client did not.
    ``on_done(usage, ok)`` runs exactly once, also when the client goes away and the stream is cancelled.
    """
    usage: Usage | None = None
    ok = False
    pending = b""
    first = True
    try:
        try:
            async for chunk in response.aiter_raw():
                if first:
                    on_first_byte()
                    first = False
                pending += chunk
                *events, pending = pending.split(b"\n\n")
                out = []
                for event in events:
                    found, usage_only = _usage_event(event)
                    if found is not None:
                        usage = found
                    if not (usage_only and drop_usage_event):
                        out.append(event + b"\n\n")
                if out:
                    yield b"".join(out)
            if pending.strip():
                yield pending
            ok = True
        except httpx.HTTPError as e:
            log.warning("stream from %s broke off: %r", response.url, e)
            yield stream_error_event(f"the backend's stream broke off: {type(e).__name__}")
    finally:
        await response.aclose()
        on_done(usage, ok)
