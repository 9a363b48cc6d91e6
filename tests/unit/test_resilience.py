"""Failures of backends, of the scorer and of clients, over real HTTP on 127.0.0.1."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from router.config import ScorerConfig
from router.scorer.features import FeatureExtractor
from tests.support.servers import FakeBackend, serve
from tests.support.stack import make_settings, metric, running_gateway

MESSAGES = [{"role": "user", "content": "What is 2 + 2?"}]


@pytest.fixture
def backends() -> Iterator[tuple[FakeBackend, FakeBackend, str, str]]:
    small, large = FakeBackend("org/small", "small says 4"), FakeBackend("org/large", "large says 4")
    with serve(small.app) as small_url, serve(large.app) as large_url:
        yield small, large, small_url, large_url


def client(url: str, **kwargs: object) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, **kwargs)  # type: ignore[arg-type]


def test_a_5xx_before_any_byte_fails_over_and_a_named_backend_passes_it_on(
        backends, tmp_path: Path, tiny_scorer_cfg: ScorerConfig, tiny_extractor: FeatureExtractor) -> None:
    small, large, small_url, large_url = backends
    large.status = 503
    settings = make_settings(tmp_path, tiny_scorer_cfg, tiny_extractor.info, small_url, large_url)
    with running_gateway(settings) as url:
        raw = client(url).chat.completions.with_raw_response.create(model="router", messages=MESSAGES)
        assert (raw.headers["x-router-backend"], raw.headers["x-router-reason"]) == ("small", "failover")
        assert len(large.received) == 1 and len(small.received) == 1
        with pytest.raises(openai.InternalServerError) as err:
            client(url).chat.completions.create(model="large", messages=MESSAGES)
        assert err.value.status_code == 503  # the backend's own error, not hidden


def test_a_backend_slower_than_its_first_byte_timeout_fails_over(
        backends, tmp_path: Path, tiny_scorer_cfg: ScorerConfig, tiny_extractor: FeatureExtractor) -> None:
    _small, large, small_url, large_url = backends
    large.delay_s = 30  # far longer than its first-byte timeout: only abandoning it answers in time
    settings = make_settings(tmp_path, tiny_scorer_cfg, tiny_extractor.info, small_url, large_url,
                             large={"first_byte_timeout_s": 0.3})
    with running_gateway(settings) as url:
        raw = client(url, timeout=20).chat.completions.with_raw_response.create(model="router", messages=MESSAGES)
        assert raw.headers["x-router-backend"] == "small"
        assert metric(url, 'router_upstream_errors_total{backend="large",kind="timeout"}') == 1


def test_a_stream_cut_off_midway_ends_with_an_error_event(
        backends, tmp_path: Path, tiny_scorer_cfg: ScorerConfig, tiny_extractor: FeatureExtractor) -> None:
    _, large, small_url, large_url = backends
    large.break_stream_after = 2
    settings = make_settings(tmp_path, tiny_scorer_cfg, tiny_extractor.info, small_url, large_url)
    with running_gateway(settings) as url:
        with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=10,
                          json={"model": "router", "messages": MESSAGES, "stream": True}) as r:
            assert r.status_code == 200
            events = [e for e in r.read().split(b"\n\n") if e]
        assert len(events) == 3  # two chunks relayed, then the error
        assert b'"code":"stream_interrupted"' in events[-1]
        assert metric(url, 'router_requests_total{backend="large",reason="threshold_met",status="502"}') == 1


def test_a_client_that_leaves_cancels_the_upstream_request(
        backends, tmp_path: Path, tiny_scorer_cfg: ScorerConfig, tiny_extractor: FeatureExtractor) -> None:
    small, _, small_url, large_url = backends
    small.delay_s = 30
    small.text = " ".join(["word"] * 100)
    settings = make_settings(tmp_path, tiny_scorer_cfg, tiny_extractor.info, small_url, large_url)
    with running_gateway(settings) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/chat/completions", json={"model": "small", "messages": MESSAGES}, timeout=0.5)
        deadline = time.monotonic() + 5
        while small.cancelled < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert small.cancelled == 1
        small.delay_s, small.chunk_delay_s = 0, 0.2  # now a slow stream, left after its first chunks
        with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=10,
                          json={"model": "small", "messages": MESSAGES, "stream": True}) as r:
            next(r.iter_raw())
        deadline = time.monotonic() + 5
        while small.cancelled < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert small.cancelled == 2
        assert metric(url, "router_requests_in_flight") == 0


def test_a_failing_backend_leaves_the_candidates_and_rejoins(
        backends, tmp_path: Path, tiny_scorer_cfg: ScorerConfig, tiny_extractor: FeatureExtractor) -> None:
    _small, large, small_url, large_url = backends
    large.status = 500
    settings = make_settings(tmp_path, tiny_scorer_cfg, tiny_extractor.info, small_url, large_url,
                             # no cooldown ends during the test, however slow the machine: the health check reopens it
                             resilience={"failure_threshold": 2, "cooldown_s": 600, "health_interval_s": 600})
    with running_gateway(settings) as url:
        c = client(url)
        for _ in range(4):
            assert c.chat.completions.with_raw_response.create(
                model="router", messages=MESSAGES).headers["x-router-backend"] == "small"
        assert len(large.received) == 2  # its circuit opened after two failures: not tried again
        assert metric(url, 'router_backend_up{backend="large"}') == 0
        large.status = 200
        httpx.get(f"{url}/ready")  # its health check passes: one trial request, which succeeds and closes it
        assert c.chat.completions.with_raw_response.create(
            model="router", messages=MESSAGES).headers["x-router-backend"] == "large"
        assert metric(url, 'router_backend_up{backend="large"}') == 1


def test_the_scorer_failing_degrades_to_the_fallback(
        backends, tmp_path: Path, tiny_scorer_cfg: ScorerConfig, tiny_extractor: FeatureExtractor) -> None:
    _, _, small_url, large_url = backends
    scorer = tiny_scorer_cfg.model_copy(update={"timeout_s": 1e-6})  # no score can arrive in time
    settings = make_settings(tmp_path, scorer, tiny_extractor.info, small_url, large_url,
                             policy={"fallback": "small"})
    with running_gateway(settings) as url:
        raw = client(url).chat.completions.with_raw_response.create(model="router", messages=MESSAGES)
        assert (raw.headers["x-router-backend"], raw.headers["x-router-reason"]) == ("small", "unscored")
        # refused at once once the warm-up pass has been timed (overloaded), else waited out (timeout)
        assert metric(url, 'router_scorer_errors_total{kind="overloaded"}') + metric(
            url, 'router_scorer_errors_total{kind="timeout"}') == 1
