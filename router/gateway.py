"""One request's path after parsing: decide, forward (failing over before the first byte), relay, observe."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi.responses import Response, StreamingResponse

from router.config import Settings
from router.errors import APIError
from router.metrics import Metrics
from router.policy import Decision, Reason, request_cost
from router.routing import Routed, Router
from router.scorer.features import Message
from router.upstream import Pool, UpstreamUnreachable, Usage, relay_stream, usage_of_body

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 2  # the chosen backend, then at most one other before giving up

THRESHOLD_HEADER = "x-router-threshold"


@dataclass(frozen=True)
class Forward:
    """A parsed request, ready to route."""

    path: str  # relative to a backend's base URL, e.g. "chat/completions"
    body: dict[str, Any]
    model: str
    messages: Sequence[Message]  # what the scorer reads
    stream: bool
    client_wants_usage: bool
    output_tokens: int | None


def parse_threshold(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        t = float(value)
    except ValueError:
        t = float("nan")
    if not 0.0 <= t <= 1.0:
        raise APIError(400, f"header {THRESHOLD_HEADER} must be a number between 0 and 1, got {value!r}",
                       param=THRESHOLD_HEADER, code="invalid_header")
    return t


class Gateway:
    def __init__(self, settings: Settings, router: Router, pool: Pool, metrics: Metrics) -> None:
        self.settings = settings
        self.router = router
        self.pool = pool
        self.metrics = metrics

    async def route(self, fwd: Forward, threshold: float | None) -> Routed:
        explicit = self.router.explicit_backend(fwd.model)
        if explicit is not None:
            return Routed(Decision(explicit, Reason.EXPLICIT, (explicit,)))
        prompt_chars = sum(len(str(m.get("content") or "")) for m in fwd.messages)
        return await self.router.decide(fwd.messages, threshold=threshold, output_tokens=fwd.output_tokens,
                                        prompt_chars=prompt_chars)

    async def handle(self, fwd: Forward, threshold: float | None) -> Response:
        routed = await self.route(fwd, threshold)
        self.metrics.in_flight.inc()
        streaming = False
        try:
            response = await self._forward(fwd, routed)
            streaming = isinstance(response, StreamingResponse)  # its relay lowers the gauge when it ends
            return response
        finally:
            if not streaming:
                self.metrics.in_flight.dec()

    def _headers(self, backend: str, routed: Routed, reason: str) -> dict[str, str]:
        headers = {"x-router-backend": backend, "x-router-reason": reason}
        if backend in routed.probabilities:
            headers["x-router-p-success"] = f"{routed.probabilities[backend]:.4f}"
        if routed.scorer_ms is not None:
            headers["x-router-scorer-ms"] = f"{routed.scorer_ms:.2f}"
        return headers

    def _record(self, backend: str, status: int, reason: str, usage: Usage | None, routed: Routed) -> None:
        m = self.metrics
        m.requests.labels(backend, str(status), reason).inc()
        if backend in routed.probabilities:
            m.predicted_success.labels(backend).observe(routed.probabilities[backend])
        if usage is not None:
            cfg = self.settings.backend(backend)
            m.prompt_tokens.labels(backend).inc(usage.prompt_tokens)
            m.completion_tokens.labels(backend).inc(usage.completion_tokens)
            m.cost.labels(backend).inc(request_cost(cfg.input_cost_per_mtok, cfg.output_cost_per_mtok,
                                                    usage.prompt_tokens, usage.completion_tokens))

    async def _forward(self, fwd: Forward, routed: Routed) -> Response:
        decision = routed.decision
        failures: list[str] = []
        for attempt, name in enumerate(decision.order[:MAX_ATTEMPTS]):
            backend = self.pool[name]
            body = dict(fwd.body, model=backend.cfg.model)
            if fwd.stream and not fwd.client_wants_usage:
                body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
            reason = decision.reason.value if attempt == 0 else "failover"
            started = time.perf_counter()
            try:
                response = await backend.open(fwd.path, orjson.dumps(body))
            except UpstreamUnreachable as e:
                self.metrics.upstream_errors.labels(name, e.kind).inc()
                failures.append(str(e))
                continue
            if response.status_code >= 500 and attempt + 1 < min(MAX_ATTEMPTS, len(decision.order)):
                await response.aclose()
                self.metrics.upstream_errors.labels(name, "status_5xx").inc()
                failures.append(f"backend {name}: HTTP {response.status_code}")
                continue
            headers = self._headers(name, routed, reason)
            if not (fwd.stream and response.status_code == 200):
                content = await response.aread()
                await response.aclose()
                self.metrics.upstream_seconds.labels(name).observe(time.perf_counter() - started)
                usage = usage_of_body(content) if response.status_code == 200 else None
                self._record(name, response.status_code, reason, usage, routed)
                media = response.headers.get("content-type", "application/json")
                return Response(content, status_code=response.status_code, media_type=media, headers=headers)
            return StreamingResponse(
                relay_stream(
                    response,
                    drop_usage_event=not fwd.client_wants_usage,
                    on_first_byte=lambda n=name, s=started: self.metrics.ttft_seconds.labels(n).observe(
                        time.perf_counter() - s),
                    on_done=lambda usage, ok, n=name, s=started, r=reason: self._stream_done(
                        n, s, r, usage, ok, routed),
                ),
                status_code=200,
                media_type=response.headers.get("content-type", "text/event-stream"),
                headers=headers,
            )
        detail = "; ".join(failures) or "no backend to try"
        self.metrics.requests.labels(decision.backend, "502", decision.reason.value).inc()
        raise APIError(502, f"no backend could answer: {detail}", code="upstream_unavailable")

    def _stream_done(self, backend: str, started: float, reason: str, usage: Usage | None, ok: bool,
                     routed: Routed) -> None:
        self.metrics.upstream_seconds.labels(backend).observe(time.perf_counter() - started)
        self._record(backend, 200 if ok else 599, reason, usage, routed)
        self.metrics.in_flight.dec()
