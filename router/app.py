"""The app factory. Nothing happens at import; each call builds an independent app."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from fastapi import FastAPI

from router.api import HOT_ROUTES, metrics, routes
from router.auth import APIKeyMiddleware, Authenticator
from router.config import PolicyConfig, Settings
from router.decision_log import DecisionLog
from router.feedback import FeedbackStore
from router.gateway import Gateway
from router.hot_routes import HotRoutes
from router.http import install_error_handlers
from router.learning.live import LiveLearning
from router.learning.shared_target import SharedTarget
from router.learning.target import ThresholdController
from router.metrics import BackendStates, CacheCounts, Metrics
from router.request import Resolver
from router.routing import ProbeGroup, Router
from router.score_cache import ScoreCache
from router.session_state import open_affinity, open_conversations
from router.state import SharedState
from router.upstream import Pool


def create_app(settings: Settings, probe_groups: Sequence[ProbeGroup]) -> FastAPI:
    """An app serving ``settings`` with already opened scorers and their probes (``routing.load_probe_groups``)."""
    app_metrics = Metrics()
    obs = settings.observability
    shared = SharedState(settings.state, FeedbackStore(obs.feedback_max_entries, obs.feedback_ttl_s),
                         app_metrics.registry)
    affinity = open_affinity(settings.affinity, shared.redis)
    conversations = open_conversations(settings.responses, shared.redis)
    controller = open_target(settings.policy)
    target = SharedTarget(controller, shared.redis) if controller is not None else None
    app_metrics.threshold.set_function(target.threshold if target is not None else lambda: settings.policy.threshold)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for group in probe_groups:
            await group.scorer.start(on_batch=app_metrics.observe_batch)
        app_metrics.scorer_up.set_function(lambda: all(g.scorer.alive for g in probe_groups))
        pool = Pool(settings.backends, settings.resilience)
        states = BackendStates(pool.states)
        app_metrics.registry.register(states)
        decisions = DecisionLog(obs.decision_log) if obs.decision_log else None
        cache = ScoreCache(settings.scorer.cache, shared.redis)
        cache_counts = CacheCounts(lambda: {"hit": cache.hits, "shared_hit": cache.shared_hits, "miss": cache.misses})
        app_metrics.registry.register(cache_counts)
        router = Router(settings, probe_groups, app_metrics, cache, affinity, target=target)
        learning = LiveLearning(settings, router, app_metrics) if settings.learning.enabled else None
        if learning is not None:
            await learning.start()
        app.state.pool = pool
        app.state.learning = learning
        app.state.gateway = Gateway(settings, router, pool, app_metrics, shared.answers, decisions,
                                    conversations=conversations, affinity=affinity, learning=learning)
        tasks = [asyncio.create_task(pool.run_health_checks(), name="backend-health")]
        if target is not None:
            tasks.append(asyncio.create_task(_hold(target, settings.policy.target.refresh_s, app_metrics),
                                             name="policy-target"))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await pool.aclose()
            await app.state.gateway.aclose()
            if learning is not None:
                await learning.aclose()
            await shared.aclose()
            for group in probe_groups:
                await group.scorer.aclose()
            if decisions is not None:
                decisions.close()
            app_metrics.registry.unregister(states)
            app_metrics.registry.unregister(cache_counts)

    app = FastAPI(
        title="probe-router",
        summary="OpenAI-compatible gateway that routes each request by a scorer's activations and linear probes",
        version="0.1.0",
        lifespan=lifespan,
        telemetry=None if obs.opentelemetry else {"tracing": False, "metrics": False, "logs": False},
    )
    app.state.settings = settings
    app.state.probe_groups = tuple(probe_groups)
    app.state.metrics = app_metrics
    app.state.auth = Authenticator(settings.auth, shared.limiter)
    app.state.resolver = Resolver(settings.policy, threshold=target.threshold if target is not None else None,
                                  affinity=settings.affinity)
    app.state.started = int(time.time())
    install_error_handlers(app)
    app.include_router(routes)
    if settings.server.metrics_port is None:
        app.add_api_route("/metrics", metrics, methods=["GET"], include_in_schema=False)
    app.add_middleware(HotRoutes, routes=HOT_ROUTES)
    if app.state.auth.enabled:  # added last, so it runs first
        app.add_middleware(APIKeyMiddleware, auth=app.state.auth)
    return app


def open_target(policy: PolicyConfig) -> ThresholdController | None:
    """The controller holding ``policy.target`` by moving the threshold (None without a target)."""
    t = policy.target
    if t is None:
        return None
    return ThresholdController(t.kind, t.value, initial=policy.threshold, window=t.window, min_entries=t.min_requests,
                               gain=t.gain, feedback=t.feedback, half_life=t.half_life, max_age_s=t.max_age_s)


async def _hold(target: SharedTarget, every_s: float, metrics: Metrics) -> None:
    """Recompute the target's threshold from its window (the fleet's, with Redis) every ``every_s`` (off the
    request path: a few milliseconds of numpy for a window of 1,000)."""
    while True:
        await asyncio.sleep(every_s)
        await target.refresh()
        if target.controller.realised is not None:
            metrics.target_realised.set(target.controller.realised)


def create_metrics_app(main: FastAPI) -> FastAPI:
    """/metrics of ``main`` alone, for an internal port (no key: keep that port off the public network)."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    app.state.metrics = main.state.metrics
    app.add_api_route("/metrics", metrics, methods=["GET"])
    return app
