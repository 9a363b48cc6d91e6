"""One request's path after parsing: decide, forward (failing over before the first byte), relay, observe."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi.responses import Response, StreamingResponse
from starlette.types import Message as ASGIMessage
from starlette.types import Receive, Scope, Send

from router.auth import Grant
from router.config import Settings
from router.decision_log import DecisionLog
from router.edge import CANCEL_ON_DISCONNECT, CLIENT_GONE
from router.errors import APIError
from router.feedback import Answered
from router.metrics import Metrics
from router.policy import Decision, Reason, request_cost
from router.routing import RoutableRequest, Routed, Router
from router.state import AnswerStore
from router.upstream import Outcome, Pool, UpstreamBroken, UpstreamUnreachable, outcome_of_body, relay_stream

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompletionCall:
    """A parsed completion request: what routing reads, and what is forwarded."""

    route: RoutableRequest
    path: str  # relative to a backend's base URL, e.g. "chat/completions"
    body: dict[str, Any]
    stream: bool
    client_wants_usage: bool


@dataclass
class InFlight:
    """One request's life in the gateway, from its decision to its last byte."""

    id: str
    call: CompletionCall
    routed: Routed
    threshold: float | None
    started: float  # time.monotonic()
    grant: Grant

    @property
    def decision(self) -> Decision:
        return self.routed.decision


class RelayResponse(StreamingResponse):
    """A relayed stream bounded on the client's side: a client that takes none of it for ``send_timeout_s``, or
    whose answer is still going at ``deadline`` (monotonic), is cut off, and the upstream request is closed. That
    is the client's doing or the request's limit, so the backend's breaker never hears of it. A client that
    disconnects is seen by the edge (router/edge.py), which cancels this task: no second task per stream waiting
    for the disconnect (Starlette's StreamingResponse starts one under uvicorn, whose protocols speak ASGI 2.3)."""

    def __init__(self, content: AsyncIterator[bytes], *, deadline: float, send_timeout_s: float,
                 **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.deadline = deadline
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
            await self.body_iterator.aclose()  # type: ignore[attr-defined]
        if self.background is not None:
            await self.background()


class Gateway:
    def __init__(self, settings: Settings, router: Router, pool: Pool, metrics: Metrics,
                 answers: AnswerStore, decisions: DecisionLog | None) -> None:
        self.settings = settings
        self.router = router
        self.pool = pool
        self.metrics = metrics
        self.answers = answers
        self.decisions = decisions
        self.reference = settings.reference_backend()
        self._writes: set[asyncio.Task[None]] = set()  # answers of ended streams being remembered

    async def handle(self, call: CompletionCall, threshold: float | None, request_id: str, grant: Grant) -> Response:
        available = self.pool.available()
        if grant.backends is not None:
            available &= grant.backends
        routed = await self.router.route(call.route, available=available, threshold=threshold, client=grant.client)
        if routed.decision.reason is Reason.EXPLICIT and grant.backends is not None \
                and routed.decision.backend not in grant.backends:
            raise APIError(403, f"key {grant.client!r} may not use backend {routed.decision.backend!r}",
                           param="model", code="model_not_allowed")
        ex = InFlight(request_id, call, routed, threshold, time.monotonic(), grant)
        self.metrics.in_flight.inc()
        streaming = False
        try:
            response = await self._forward(ex, self._candidates(routed.decision, available, grant))
            streaming = isinstance(response, StreamingResponse)  # its relay lowers the gauge when it ends
            return response
        finally:
            if not streaming:
                self.metrics.in_flight.dec()

    @staticmethod
    def _candidates(decision: Decision, available: set[str], grant: Grant) -> list[str]:
        """The decision's order, less backends the key may not use, with those whose circuit is open moved to the
        end (tried only if all fail)."""
        order = list(decision.order)
        if grant.backends is not None:
            order = [n for n in order if n in grant.backends]
        if len(order) == 1:  # a named backend: nothing to reorder
            return order
        return [n for n in order if n in available] + [n for n in order if n not in available]

    async def _forward(self, ex: InFlight, candidates: list[str]) -> Response:
        resilience = self.settings.resilience
        deadline = ex.started + resilience.deadline_s
        failures: list[str] = []
        for attempt, name in enumerate(candidates[:resilience.max_attempts]):
            remaining = deadline - time.monotonic()
            if attempt > 0 and remaining <= 0:
                failures.append(f"deadline of {resilience.deadline_s:g}s passed")
                break
            backend = self.pool[name]
            reason = ex.decision.reason if attempt == 0 else Reason.FAILOVER
            body = dict(ex.call.body, model=backend.cfg.model)
            if ex.call.stream and not ex.call.client_wants_usage:
                body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
            sent = time.monotonic()
            try:
                response = await backend.open(ex.call.path, orjson.dumps(body), timeout_s=max(remaining, 0.001))
            except UpstreamUnreachable as e:
                self.metrics.upstream_errors.labels(name, e.kind).inc()
                failures.append(str(e))
                continue
            if 300 <= response.status_code < 400:  # redirects are not followed: the backend is misconfigured
                await response.aclose()
                backend.breaker.failure()
                self.metrics.upstream_errors.labels(name, "redirect").inc()
                failures.append(f"backend {name}: answered with a redirect (HTTP {response.status_code})")
                continue
            if response.status_code >= 500:
                self.metrics.upstream_errors.labels(name, "status_5xx").inc()
                if ex.decision.reason is not Reason.EXPLICIT:  # a named backend's own error goes to the client
                    await response.aclose()
                    failures.append(f"backend {name}: HTTP {response.status_code}")
                    continue
            headers = self._headers(ex, name, reason)
            if not (ex.call.stream and response.status_code == 200):
                try:
                    content = await response.aread()
                except UpstreamBroken as e:  # cut off before the client got a byte: still free to fail over
                    backend.breaker.failure()
                    self.metrics.upstream_errors.labels(name, "read").inc()
                    failures.append(f"backend {name}: answer cut off ({e})")
                    continue
                finally:
                    await response.aclose()
                self.metrics.child(self.metrics.upstream_seconds, name).observe(time.monotonic() - sent)
                outcome = outcome_of_body(content) if response.status_code == 200 else Outcome()
                self._finish(ex, name, response.status_code, reason, outcome)
                if response.status_code == 200:  # remembered before the client has the id
                    await self._remember(ex, name, outcome)
                media = response.headers.get("content-type", "application/json")
                return Response(content, status_code=response.status_code, media_type=media, headers=headers)
            return RelayResponse(
                relay_stream(
                    response, backend,
                    drop_usage_event=not ex.call.client_wants_usage,
                    deadline=ex.started + backend.cfg.total_timeout_s,
                    on_first_byte=lambda n=name, s=sent: self.metrics.child(self.metrics.ttft_seconds, n).observe(
                        time.monotonic() - s),
                    on_done=lambda outcome, n=name, s=sent, r=reason: self._stream_done(ex, n, s, r, outcome),
                ),
                deadline=ex.started + backend.cfg.total_timeout_s,
                send_timeout_s=self.settings.server.send_timeout_s,
                status_code=200,
                media_type=response.headers.get("content-type", "text/event-stream"),
                headers=headers,
            )
        self._finish(ex, ex.decision.backend, 502, ex.decision.reason, Outcome())
        detail = "; ".join(failures) or "no backend to try"
        raise APIError(502, f"no backend could answer: {detail}", code="upstream_unavailable",
                       headers={"x-router-request-id": ex.id})

    def _headers(self, ex: InFlight, backend: str, reason: Reason) -> dict[str, str]:
        headers = {"x-router-request-id": ex.id, "x-router-backend": backend, "x-router-reason": reason}
        if backend in ex.routed.probabilities:
            headers["x-router-p-success"] = f"{ex.routed.probabilities[backend]:.4f}"
        if ex.routed.scorer_ms is not None:
            headers["x-router-scorer-ms"] = f"{ex.routed.scorer_ms:.2f}"
        return headers

    def _stream_done(self, ex: InFlight, backend: str, sent: float, reason: Reason, outcome: Outcome) -> None:
        self.metrics.child(self.metrics.upstream_seconds, backend).observe(time.monotonic() - sent)
        self._finish(ex, backend, 200 if outcome.ok else 502, reason, outcome)
        self.metrics.in_flight.dec()
        if outcome.ok:  # on_done is synchronous: remembered as the stream's last bytes go out
            task = asyncio.create_task(self._remember(ex, backend, outcome))
            self._writes.add(task)
            task.add_done_callback(self._writes.discard)

    async def _remember(self, ex: InFlight, backend: str, outcome: Outcome) -> None:
        await self.answers.remember(ex.id, backend, ex.routed.probabilities.get(backend), outcome.completion_id,
                                    ex.grant.client)

    async def aclose(self) -> None:
        """Wait for the answers still being remembered."""
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)

    def _finish(self, ex: InFlight, backend: str, status: int, reason: Reason, outcome: Outcome) -> None:
        """Count the answer and log the decision."""
        m = self.metrics
        m.child(m.requests, backend, str(status), reason).inc()
        p = ex.routed.probabilities.get(backend)
        if p is not None:
            m.child(m.predicted_success, backend).observe(p)
        cost = None
        usage = outcome.usage
        if usage is not None:
            cfg, ref = self.settings.backend(backend), self.reference
            cost = request_cost(cfg.input_cost_per_mtok, cfg.output_cost_per_mtok, usage.prompt_tokens,
                                usage.completion_tokens)
            m.child(m.prompt_tokens, backend).inc(usage.prompt_tokens)
            m.child(m.completion_tokens, backend).inc(usage.completion_tokens)
            m.child(m.cost, backend).inc(cost)
            m.child(m.reference_cost, backend).inc(request_cost(ref.input_cost_per_mtok, ref.output_cost_per_mtok,
                                                             usage.prompt_tokens, usage.completion_tokens))
        ex.grant.settle(usage.prompt_tokens + usage.completion_tokens if usage is not None else None)
        if self.decisions is not None:
            self.decisions.write({
                "id": ex.id,
                "completion_id": outcome.completion_id,
                "time": time.time(),
                "model": ex.call.route.model,
                "backend": backend,
                "reason": reason,
                "status": status,
                "probabilities": ex.routed.probabilities,
                "threshold": self.settings.policy.threshold if ex.threshold is None else ex.threshold,
                "scorer_ms": ex.routed.scorer_ms,
                "prompt_tokens": usage.prompt_tokens if usage else None,
                "completion_tokens": usage.completion_tokens if usage else None,
                "cost_usd": cost,
                "latency_s": round(time.monotonic() - ex.started, 4),
                "error": outcome.error,
                "prompt": ex.call.route.messages,
            })

    async def rate(self, answer_id: str, score: float, client: str) -> Answered:
        """Record ``client``'s rating of an answer it received (another key's answers are not found)."""
        answered = await self.answers.take(answer_id, client)
        if answered is None:
            raise APIError(404, f"no answer {answer_id!r} to rate: unknown, expired, or already rated",
                           param="id", code="answer_not_found")
        self.metrics.feedback.labels(answered.backend).inc()
        self.metrics.feedback_score.labels(answered.backend).inc(score)
        return answered
