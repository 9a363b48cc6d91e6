"""One request's path after parsing: decide, forward (failing over before the first byte), relay, observe."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import orjson

from router.auth import Grant
from router.config import Settings
from router.decision_log import DecisionLog
from router.errors import NotFound, UpstreamFailed
from router.feedback import Answered
from router.metrics import Metrics
from router.policy import Decision, Reason, request_cost
from router.request import CompletionCall
from router.routing import Routed, Router
from router.state import AnswerStore
from router.upstream import (
    Outcome,
    Pool,
    Reply,
    UpstreamBroken,
    UpstreamUnreachable,
    outcome_of_body,
    relay_stream,
)

log = logging.getLogger(__name__)


@dataclass
class InFlight:
    """One request's life in the gateway, from its decision to its last byte."""

    id: str
    call: CompletionCall
    routed: Routed
    started: float  # time.monotonic()
    grant: Grant

    @property
    def decision(self) -> Decision:
        return self.routed.decision


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

    async def handle(self, call: CompletionCall, request_id: str, grant: Grant) -> Reply:
        """Route ``call``, forward it (failing over before the first byte) and return the answer; a RouterError
        when it is refused (routing) or no backend could answer."""
        available = self.pool.available()
        routed = await self.router.route(call.request, available=available)
        ex = InFlight(request_id, call, routed, time.monotonic(), grant)
        self.metrics.in_flight.inc()
        streaming = False
        try:
            reply = await self._forward(ex, self._candidates(routed.decision, available))
            streaming = reply.stream is not None  # its relay lowers the gauge when it ends
            return reply
        finally:
            if not streaming:
                self.metrics.in_flight.dec()

    @staticmethod
    def _candidates(decision: Decision, available: set[str]) -> list[str]:
        """The decision's order (only backends the key may use: routing saw to that) with those whose circuit is
        open moved to the end (tried only if all fail)."""
        order = list(decision.order)
        if len(order) == 1:  # a named backend: nothing to reorder
            return order
        return [n for n in order if n in available] + [n for n in order if n not in available]

    async def _forward(self, ex: InFlight, candidates: list[str]) -> Reply:
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
                return Reply(response.status_code, headers, media, body=content)
            deadline = ex.started + backend.cfg.total_timeout_s
            return Reply(
                200, headers, response.headers.get("content-type", "text/event-stream"),
                stream=relay_stream(
                    response, backend,
                    drop_usage_event=not ex.call.client_wants_usage,
                    deadline=deadline,
                    on_first_byte=lambda n=name, s=sent: self.metrics.child(self.metrics.ttft_seconds, n).observe(
                        time.monotonic() - s),
                    on_done=lambda outcome, n=name, s=sent, r=reason: self._stream_done(ex, n, s, r, outcome),
                ),
                deadline=deadline,
            )
        self._finish(ex, ex.decision.backend, 502, ex.decision.reason, Outcome())
        detail = "; ".join(failures) or "no backend to try"
        raise UpstreamFailed(f"no backend could answer: {detail}", code="upstream_unavailable",
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
                                    ex.call.request.client)

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
                "model": ex.call.request.model,
                "backend": backend,
                "reason": reason,
                "status": status,
                "probabilities": ex.routed.probabilities,
                "threshold": ex.call.request.threshold,
                "scorer_ms": ex.routed.scorer_ms,
                "prompt_tokens": usage.prompt_tokens if usage else None,
                "completion_tokens": usage.completion_tokens if usage else None,
                "cost_usd": cost,
                "latency_s": round(time.monotonic() - ex.started, 4),
                "error": outcome.error,
                "prompt": ex.call.request.messages,
            })

    async def rate(self, answer_id: str, score: float, client: str) -> Answered:
        """Record ``client``'s rating of an answer it received (another key's answers are not found)."""
        answered = await self.answers.take(answer_id, client)
        if answered is None:
            raise NotFound(f"no answer {answer_id!r} to rate: unknown, expired, or already rated", param="id",
                           code="answer_not_found")
        self.metrics.feedback.labels(answered.backend).inc()
        self.metrics.feedback_score.labels(answered.backend).inc(score)
        return answered
