"""The app factory. Nothing happens at import; each call builds an independent app."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from router.api import HOT_ROUTES, metrics, routes
from router.auth import APIKeyMiddleware, Authenticator
from router.config import Settings
from router.decision_log import DecisionLog
from router.errors import install_error_handlers
from router.feedback import FeedbackStore
from router.gateway import Gateway
from router.hot_routes import HotRoutes
from router.metrics import BackendStates, Metrics
from router.routing import Engine, Router
from router.scorer.batcher import MicroBatcher
from router.upstream import Pool

# A question of typical length (the median GSM8K test question has 55 words) for the scorer's warm-up pass,
# which also seeds its estimate of the time per prompt (see scorer.batcher).
WARMUP_QUESTION = ("A bakery sells 48 muffins in the morning and a third as many in the afternoon. Each muffin "
                   "costs $2.50, and the bakery spends $30 a day on flour, sugar and butter. On Sundays it sells "
                   "twice as many muffins as on other days. How much profit does the bakery make from its muffins "
                   "on a Sunday?")


def create_app(settings: Settings, engine: Engine) -> FastAPI:
    """An app serving ``settings`` with an already loaded ``engine`` (see ``routing.load_engine``)."""
    app_metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher = MicroBatcher(
            engine.extractor.features,
            max_batch_size=settings.scorer.max_batch_size,
            max_wait_s=settings.scorer.max_wait_ms / 1000,
            max_queue=settings.scorer.max_queue,
            on_batch=lambda stats: app_metrics.scorer_batch_size.observe(stats.size),
            warmup=[{"role": "user", "content": WARMUP_QUESTION}],
        )
        pool = Pool(settings.backends, settings.resilience)
        states = BackendStates(pool.states)
        app_metrics.registry.register(states)
        obs = settings.observability
        decisions = DecisionLog(obs.decision_log) if obs.decision_log else None
        router = Router(settings, engine.probes, batcher, app_metrics)
        app.state.batcher = batcher
        app.state.pool = pool
        app.state.gateway = Gateway(settings, router, pool, app_metrics,
                                    FeedbackStore(obs.feedback_max_entries, obs.feedback_ttl_s), decisions)
        health = asyncio.create_task(pool.run_health_checks(), name="backend-health")
        try:
            yield
        finally:
            health.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await health
            await pool.aclose()
            batcher.close()
            if decisions is not None:
                decisions.close()
            app_metrics.registry.unregister(states)

    app = FastAPI(
        title="probe-router",
        summary="OpenAI-compatible gateway that routes each request by a scorer's activations and linear probes",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = app_metrics
    app.state.auth = Authenticator(settings.auth)
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
