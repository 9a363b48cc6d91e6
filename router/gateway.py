"""One request's path after parsing: decide, forward (failing over before the first byte), relay, observe; and
what an answer leaves behind: the answer awaiting feedback, the session's pin (``router.affinity``), the
conversation a Responses request may be continued from (``router.responses``)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from router.auth import NO_CHARGE, Grant
from router.config import Settings
from router.decision_log import DecisionLog
from router.errors import NotFound, UpstreamFailed
from router.feedback import Answered
from router.learning.live import LiveLearning
from router.metrics import Metrics
from router.policy import Decision, Reason, request_cost
from router.request import CompletionCall
from router.responses import ResponsesCall, ResponsesRequest, conversation_after, prepare, previous_not_found
from router.routing import Routed, Router
from router.session_state import AffinityStore, ConversationStore
from router.state import AnswerStore
from router.upstream import Outcome, Pool, Reply, UpstreamBroken, UpstreamUnreachable, relay_stream

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


SAVED_STATUSES = ("completed", "incomplete")  # responses whose conversation can be continued


class Gateway:
    def __init__(self, settings: Settings, router: Router, pool: Pool, metrics: Metrics,
                 answers: AnswerStore, decisions: DecisionLog | None, *,
                 conversations: ConversationStore | None = None, affinity: AffinityStore | None = None,
                 learning: LiveLearning | None = None) -> None:
        """``conversations``: where Responses conversations are kept (None: /v1/responses cannot be continued);
        ``affinity``: where sessions are pinned (None: affinity off). Both from ``router.session_state``.
        ``learning``: what answers keep for their ratings and where ratings go (None: learning off)."""
        self.settings = settings
        self.router = router
        self.pool = pool
        self.metrics = metrics
        self.answers = answers
        self.decisions = decisions
        self.conversations = conversations
        self.affinity = affinity
        self.learning = learning
        self.reference = settings.reference_backend()
        self._writes: set[asyncio.Task[None]] = set()  # what ended streams leave behind, being written

    async def conversation(self, body: Mapping[str, Any], req: ResponsesRequest, owner: str) -> ResponsesCall:
        """A Responses request made self-contained: its ``previous_response_id`` expanded from the conversations
        kept for ``owner`` (NotFound if none is kept under it: unknown, expired, too large, or another key's)."""
        stored = None
        if req.previous_response_id is not None:
            if self.conversations is not None:
                stored = await self.conversations.load(req.previous_response_id, owner)
            self.metrics.child(self.metrics.conversations, "expanded" if stored is not None else "not_found").inc()
            if stored is None:
                raise previous_not_found(req.previous_response_id)
        return prepare(body, req, stored)

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

    async def decide(self, call: CompletionCall, request_id: str) -> Reply:
        """POST /v1/route: where ``call`` would go and why, as JSON, without forwarding it. The client is told to
        go to the chosen backend, so the request's session is pinned to it, and the decision awaits feedback under
        ``request_id`` as an answer would (rated by the client that asked)."""
        routed = await self.router.route(call.request, available=self.pool.available())
        decision, request = routed.decision, call.request
        backend = decision.backend
        self.metrics.child(self.metrics.route_only, backend, decision.reason).inc()
        writes = [self.answers.remember(request_id, backend, routed.probabilities.get(backend), None, request.client)]
        if (self.affinity is not None and request.session is not None and routed.affinity is not None
                and routed.affinity.pin):
            writes.append(self.affinity.pin(request.session.key, backend))
        await asyncio.gather(*writes)
        body = {
            "id": request_id,
            "object": "router.decision",
            "backend": backend,
            "model": self.settings.backend(backend).model,
            "reason": str(decision.reason),
            "p_success": routed.probabilities.get(backend),
            "estimates": routed.probabilities,
            "threshold": request.threshold,
            "scorer_ms": routed.scorer_ms,
            "order": list(decision.order),
            "affinity": str(routed.affinity.verdict) if routed.affinity is not None else None,
        }
        headers = self._headers(InFlight(request_id, call, routed, time.monotonic(), NO_CHARGE), backend,
                                decision.reason)
        return Reply(200, headers, body=orjson.dumps(body))

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
            call = ex.call
            body = call.protocol.upstream_body(call.body, backend.cfg.model, stream=call.stream,
                                               client_wants_usage=call.client_wants_usage)
            sent = time.monotonic()
            try:
                response = await backend.open(call.path, orjson.dumps(body), timeout_s=max(remaining, 0.001))
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
            if not (call.stream and response.status_code == 200):
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
                outcome = call.protocol.outcome_of_body(content) if response.status_code == 200 else Outcome()
                self._finish(ex, name, response.status_code, reason, outcome)
                if response.status_code == 200:  # remembered before the client has the id
                    await asyncio.gather(self._remember(ex, name, outcome), self._keep_conversation(ex, outcome))
                media = response.headers.get("content-type", "application/json")
                return Reply(response.status_code, headers, media, body=content)
            deadline = ex.started + backend.cfg.total_timeout_s
            return Reply(
                200, headers, response.headers.get("content-type", "text/event-stream"),
                stream=relay_stream(
                    response, backend,
                    reader=call.protocol.reader(client_wants_usage=call.client_wants_usage),
                    deadline=deadline,
                    on_first_byte=lambda n=name, s=sent: self.metrics.child(self.metrics.ttft_seconds, n).observe(
                        time.monotonic() - s),
                    on_done=lambda outcome, n=name, s=sent, r=reason: self._stream_done(ex, n, s, r, outcome),
                    on_finished=(lambda outcome: self._background(self._keep_conversation(ex, outcome)))
                    if call.conversation is not None else None,
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
        if ex.routed.estimate is not None:
            headers["x-router-stage"] = ex.routed.estimate.stage
        return headers

    def _stream_done(self, ex: InFlight, backend: str, sent: float, reason: Reason, outcome: Outcome) -> None:
        self.metrics.child(self.metrics.upstream_seconds, backend).observe(time.monotonic() - sent)
        self._finish(ex, backend, 200 if outcome.ok else 502, reason, outcome)
        self.metrics.in_flight.dec()
        if outcome.ok:  # on_done is synchronous: remembered as the stream's last bytes go out
            self._background(self._remember(ex, backend, outcome))

    def _background(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``work`` on its own, kept until done (``aclose`` waits for it)."""
        task = asyncio.create_task(work)
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)
        return task

    async def _remember(self, ex: InFlight, backend: str, outcome: Outcome) -> None:
        """After a good answer from ``backend``: the answer awaits feedback, and the request's session is pinned
        to the backend that answered (after failover, the one that finally did), its pin renewed."""
        request = ex.call.request
        observation = (self.learning.observation(ex.id, request, ex.routed, backend)
                       if self.learning is not None else None)
        remember = self.answers.remember(ex.id, backend, ex.routed.probabilities.get(backend), outcome.completion_id,
                                         request.client, observation)
        affinity = ex.routed.affinity
        if self.affinity is None or request.session is None or affinity is None or not affinity.pin:
            await remember
            return
        await asyncio.gather(remember, self.affinity.pin(request.session.key, backend))

    async def _keep_conversation(self, ex: InFlight, outcome: Outcome) -> None:
        """Record a Responses answer's whole conversation under its id, when its client asked for it to be
        stored (``store``, true by default) and it can be continued (completed, or stopped at its token limit)."""
        conversation, response = ex.call.conversation, outcome.response
        if (conversation is None or not conversation.store or self.conversations is None or response is None
                or outcome.completion_id is None or response.get("status") not in SAVED_STATUSES):
            return
        saved = await self.conversations.save(outcome.completion_id, conversation_after(conversation, response),
                                              ex.call.request.client)
        self.metrics.child(self.metrics.conversations, "saved" if saved else "too_large").inc()

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
            if reason is Reason.EXPLORE and ex.routed.chosen is not None:
                chosen = self.settings.backend(ex.routed.chosen)
                m.child(m.explore_cost, "sent").inc(cost)
                m.child(m.explore_cost, "chosen").inc(request_cost(chosen.input_cost_per_mtok,
                                                                   chosen.output_cost_per_mtok, usage.prompt_tokens,
                                                                   usage.completion_tokens))
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
                "stage": ex.routed.estimate.stage if ex.routed.estimate is not None else None,
                "chosen": ex.routed.chosen,
                "propensity": ex.routed.propensity,
                "probe_versions": dict(self.learning.served) if self.learning is not None else None,
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
        if self.learning is not None:
            self.learning.rated(answered, score, client)
        return answered
