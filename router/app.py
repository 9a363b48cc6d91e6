"""The app factory. Nothing happens at import; each call builds an independent app."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from router.api import routes
from router.config import Settings
from router.errors import install_error_handlers
from router.gateway import Gateway
from router.metrics import Metrics
from router.routing import Engine, Router
from router.scorer.batcher import MicroBatcher
from router.upstream import Pool


def create_app(settings: Settings, engine: Engine) -> FastAPI:
    """An app serving ``settings`` with an already loaded ``engine`` (see ``routing.load_engine``)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        metrics = Metrics()
        batcher = MicroBatcher(
            engine.extractor.features,
            max_batch_size=settings.scorer.max_batch_size,
            max_wait_s=settings.scorer.max_wait_ms / 1000,
            max_queue=settings.scorer.max_queue,
            on_batch=lambda stats: metrics.scorer_batch_size.observe(stats.size),
        )
        pool = Pool(settings.backends)
        router = Router(settings, engine.probes, batcher, metrics)
        app.state.settings = settings
        app.state.metrics = metrics
        app.state.batcher = batcher
        app.state.pool = pool
        app.state.gateway = Gateway(settings, router, pool, metrics)
        app.state.started = int(time.time())
        try:
            yield
        finally:
            await pool.aclose()
            batcher.close()

    app = FastAPI(
        title="probe-router",
        summary="OpenAI-compatible gateway that routes each request by a scorer's activations and linear probes",
        version="0.1.0",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.include_router(routes)
    return app
