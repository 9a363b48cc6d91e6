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
from router.config import Settings
from router.decision_log import DecisionLog
from router.feedback import FeedbackStore
from router.gateway import Gateway
from router.hot_routes import HotRoutes
from router.http import install_error_handlers
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
        router = Router(settings, probe_groups, app_metrics, cache, affinity)
        app.state.pool = pool
        app.state.gateway = Gateway(settings, router, pool, app_metrics, shared.answers, decisions,
                                    conversations=conversations, affinity=affinity)
        health = asyncio.create_task(pool.run_health_checks(), name="backend-health")
        try:
            yield
        finally:
            health.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await health
            await pool.aclose()
            await app.state.gateway.aclose()
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
    app.state.resolver = Resolver(settings.policy, affinity=settings.affinity)
    app.state.started = int(time.time())
    install_error_handlers(app)
    app.include_router(routes)
    if settings.server.metrics_port is None:
        app.add_api_route("/metrics", metrics, methods=["GET"], include_in_schema=False)
    app.add_middleware(HotRoutes, routes=HOT_ROUTES)
    if app.state.auth.enabled:  # added last, so it runs first
        app.add_middleware(APIKeyMiddleware, auth=app.state.auth)
    return app


def create_metrics_app(main: FastAPI) -> FastAPI:
    """/metrics of ``main`` alone, for an internal port (no key: keep that port off the public network)."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    app.state.metrics = main.state.metrics
    app.add_api_route("/metrics", metrics, methods=["GET"])
    return app
