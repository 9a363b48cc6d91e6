"""What the hot path's shortcuts keep: the same answers and errors, API keys first, the collector's settings, the
same metric series, FastAPI's OpenTelemetry when asked for, whole answers in one write."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import generate_latest

from router.app import create_app
from router.auth import APIKeyMiddleware, Authenticator
from router.cli import _settle_gc
from router.config import AuthConfig, ScorerConfig
from router.edge import CoalescedWrites
from router.errors import InvalidRequest
from router.feedback import FeedbackStore
from router.hot_routes import HotRoutes
from router.http import install_error_handlers
from router.limits import LocalLimiter
from router.metrics import Metrics
from router.routing import load_probe_groups
from router.scorer.features import FeatureExtractor
from tests.support.stack import make_settings


def _app(with_key: str | None = None) -> tuple[FastAPI, list[str]]:
    """A FastAPI app whose /hot route exists both as a FastAPI route and in HotRoutes; ``seen`` says which ran."""
    seen: list[str] = []

    async def hot(request: Request) -> Response:
        body = await request.json()
        if body.get("fail") == "api":
            raise InvalidRequest("bad value", param="fail", code="invalid_value")
        if body.get("fail") == "crash":
            raise RuntimeError("boom")
        seen.append("handler")
        return JSONResponse({"echo": body, "path": request.url.path})

    app = FastAPI()
    install_error_handlers(app)

    @app.post("/hot")
    async def via_fastapi(request: Request) -> Response:
        seen.append("fastapi")
        return await hot(request)

    @app.get("/cold")
    async def cold() -> dict[str, str]:
        return {"cold": "yes"}

    app.add_middleware(HotRoutes, routes={"/hot": hot})
    if with_key:
        app.add_middleware(APIKeyMiddleware, auth=Authenticator(AuthConfig(api_keys=[with_key]), LocalLimiter()))
    return app, seen


async def _client(app: FastAPI, headers: dict[str, str] | None = None) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://gw", headers=headers)


async def test_a_post_to_a_hot_route_skips_fastapis_routing_and_answers_the_same() -> None:
    app, seen = _app()
    async with await _client(app) as client:
        response = await client.post("/hot", json={"x": 1})
        assert response.status_code == 200 and response.json() == {"echo": {"x": 1}, "path": "/hot"}
        assert seen == ["handler"]  # not "fastapi" first
        assert (await client.get("/cold")).json() == {"cold": "yes"}
        assert (await client.get("/hot")).status_code == 405  # other methods: FastAPI's answer


async def test_hot_route_errors_keep_the_openai_shape() -> None:
    app, _ = _app()
    async with await _client(app) as client:
        bad = await client.post("/hot", json={"fail": "api"})
        assert bad.status_code == 400
        assert bad.json() == {"error": {"message": "bad value", "type": "invalid_request_error", "param": "fail",
                                        "code": "invalid_value"}}
        crash = await client.post("/hot", json={"fail": "crash"})
        assert crash.status_code == 500
        assert crash.json()["error"]["type"] == "server_error" and "boom" not in crash.text


async def test_api_keys_are_checked_before_a_hot_route() -> None:
    app, seen = _app(with_key="sk-test")
    async with await _client(app) as client:
        assert (await client.post("/hot", json={})).status_code == 401
        assert seen == []
    async with await _client(app, {"authorization": "Bearer sk-test"}) as client:
        assert (await client.post("/hot", json={})).status_code == 200


@pytest.fixture
def gc_restored() -> Iterator[None]:
    threshold = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


def test_settling_the_collector_freezes_what_is_loaded_and_sets_the_young_threshold(gc_restored: None) -> None:
    loaded = [{"weight": i} for i in range(1000)]
    _settle_gc(True, 12345)
    assert gc.get_freeze_count() >= len(loaded)
    assert gc.get_threshold()[0] == 12345


def test_remembered_answers_drop_out_of_the_collectors_sight() -> None:
    store = FeedbackStore(max_entries=10, ttl_s=60)
    store.remember("req-1", "small", 0.5, "cmpl-1", "anonymous")
    gc.collect()
    assert not any(gc.is_tracked(entry) for entry in store._entries.values())


def test_metric_children_are_kept_and_appear_only_once_used() -> None:
    m = Metrics()
    assert m.child(m.cost, "small") is m.child(m.cost, "small")
    m.child(m.cost, "small").inc(0.5)
    m.child(m.requests, "small", "200", "explicit").inc()
    text = generate_latest(m.registry).decode()
    assert 'router_cost_usd_total{backend="small"} 0.5' in text
    assert 'router_requests_total{backend="small",reason="explicit",status="200"} 1.0' in text
    assert 'backend="large"' not in text


@pytest.mark.parametrize("enabled", [False, True])
async def test_fastapis_opentelemetry_looks_for_providers_only_when_configured(
        enabled: bool, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_scorer_cfg: ScorerConfig,
        tiny_extractor: FeatureExtractor) -> None:
    from opentelemetry import trace

    looked_up: list[bool] = []
    real = trace.get_tracer_provider
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: looked_up.append(True) or real())
    settings = make_settings(tmp_path, tiny_scorer_cfg, tiny_extractor.info, "http://127.0.0.1:9", "http://127.0.0.1:9",
                             observability={"opentelemetry": enabled})
    app = create_app(settings, load_probe_groups(settings))
    async with await _client(app) as client:
        for _ in range(3):
            assert (await client.get("/v1/models")).status_code == 200
    assert (len(looked_up) >= 3) is enabled  # FastAPI asks on every request when it is on, never when off


class _RecordingTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


async def test_an_answers_writes_in_one_turn_of_the_loop_reach_the_socket_as_one() -> None:
    transport = _RecordingTransport()
    writes = CoalescedWrites(transport, asyncio.get_running_loop())  # type: ignore[arg-type]
    writes.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    writes.write(b"{}")
    assert transport.writes == []
    await asyncio.sleep(0)
    assert transport.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]
    writes.write(b"last")
    writes.close()  # what was held goes out before the close
    assert transport.writes[1:] == [b"last"] and transport.closed
    await asyncio.sleep(0)
    writes.write(b"after the close")
    await asyncio.sleep(0)
    assert transport.writes[1:] == [b"last"]  # nothing twice, nothing after the close
