"""Feedback, the decision log, reference cost, API keys, rate limits and the internal metrics port."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from router.app import create_app, create_metrics_app
from router.config import ScorerConfig
from router.feedback import FeedbackStore
from router.limits import TokenBucket
from router.routing import load_probe_groups
from router.scorer.features import FeatureExtractor
from tests.support.servers import FakeBackend, serve
from tests.support.stack import make_settings, metric, running_gateway

MESSAGES = [{"role": "user", "content": "What is 2 + 2?"}]


@pytest.fixture
def urls() -> Iterator[tuple[str, str]]:
    with serve(FakeBackend("org/small").app) as small_url, serve(FakeBackend("org/large").app) as large_url:
        yield small_url, large_url


def test_feedback_by_request_id_or_completion_id_counts_once(
        urls, tmp_path: Path, tiny_scorer_cfg: ScorerConfig, tiny_extractor: FeatureExtractor) -> None:
    settings = make_settings(tmp_path, tiny_scorer_cfg, tiny_extractor.info, *urls)
    with running_gateway(settings) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        raw = client.chat.completions.with_raw_response.create(model="router", messages=MESSAGES)
        request_id = raw.headers["x-router-request-id"]
        rated = httpx.post(f"{url}/v1/feedback", json={"id": request_id, "correct": True})
        assert rated.status_code == 200
        assert rated.json() == {"id": request_id, "backend": "large", "score": 1.0, "p_success": pytest.approx(0.95)}
        again = httpx.post(f"{url}/v1/feedback", json={"id": request_id, "correct": False})
        assert again.status_code == 404 and "already rated" in again.json()["error"]["message"]

        completion = client.chat.completions.create(model="router", messages=MESSAGES, stream=True)
        completion_id = next(chunk.id for chunk in completion)
        assert httpx.post(f"{url}/v1/feedback", json={"id": completion_id, "score": 0.25}).status_code == 200
        assert metric(url, 'router_feedback_total{backend="large"}') == 2
        assert metric(url, 'router_feedback_score_total{backend="large"}') == 1.25


@pytest.mark.parametrize("body", [{"id": "x"}, {"id": "x", "correct": True, "score": 1}, {"id": "x", "score": 2},
                                  {"correct": True}, {"id": "x", "correct": True, "extra": 1}])
def test_malformed_feedback_is_a_400(urls, tmp_path: Path, tiny_scorer_cfg: ScorerConfig,
                                     tiny_extractor: FeatureExtractor, body: dict[str, object]) -> None:
    settings = make_settings(tmp_path, tiny_scorer_cfg, tiny_extractor.info, *urls)
    with running_gateway(settings) as url:
        response = httpx.post(f"{url}/v1/feedback", json=body)
        assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"


def test_feedback_store_is_bounded_and_expires() -> None:
    now = [0.0]
    store = FeedbackStore(max_entries=2, ttl_s=10, clock=lambda: now[0])
    store.remember("a", "small", 0.5, "cmpl-a", "k")
    store.remember("b", "small", 0.5, None, "k")
    store.remember("c", "large", 0.9, "cmpl-c", "k")
    assert len(store) == 2 and store.take("a", "k") is None and store.take("cmpl-a", "k") is None  # evicted
    now[0] = 11
    assert store.take("cmpl-c", "k") is None and len(store) == 0  # expired


def test_reference_cost_prices_the_same_tokens_at_the_dearest_backend(
        urls, tmp_path: Path, tiny_scorer_cfg: ScorerConfig, tiny_extractor: FeatureExtractor) -> None:
    settings = make_settings(tmp_path, tiny_scorer_cfg, tiny_extractor.info, *urls)
    with running_gateway(settings) as url:
        httpx.post(f"{url}/v1/chat/completions", json={"model": "small", "messages": MESSAGES})
        # 11 prompt + 7 completion tokens: $1/$2 per Mtok on small, $10/$20 on the reference (large)
        assert metric(url, 'router_cost_usd_total{backend="small"}') == pytest.approx(25e-6)
        assert metric(url, 'router_reference_cost_usd_total{backend="small"}') == pytest.approx(250e-6)


def test_decision_log_writes_one_json_line_per_answer_without_the_prompt(
        urls, tmp_path: Path, tiny_scorer_cfg: ScorerConfig, tiny_extractor: FeatureExtractor) -> None:
    log_path = tmp_path / "decisions" / "log.jsonl"
    settings = make_settings(tmp_path, tiny_scorer_cfg, tiny_extractor.info, *urls,
                             observability={"decision_log": {"path": log_path}})
    with running_gateway(settings) as url:
        r = httpx.post(f"{url}/v1/chat/completions", json={"model": "router", "messages": MESSAGES},
                       headers={"x-router-threshold": "0.5"})
    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert len(lines) == 1
    entry = lines[0]
    assert entry["id"] == r.headers["x-router-request-id"] and entry["backend"] == "small"
    assert entry["probabilities"] == {"small": pytest.approx(0.7), "large": pytest.approx(0.95)}
    assert entry["threshold"] == 0.5 and entry["prompt_tokens"] == 11 and entry["completion_tokens"] == 7
    assert entry["cost_usd"] == pytest.approx(25e-6) and "prompt" not in entry


def test_api_keys_guard_every_route_but_health(
        urls, tmp_path: Path, tiny_scorer_cfg: ScorerConfig, tiny_extractor: FeatureExtractor) -> None:
    settings = make_settings(tmp_path, tiny_scorer_cfg, tiny_extractor.info, *urls,
                             auth={"api_keys": ["sk-one", "sk-two"]})
    with running_gateway(settings) as url:
        assert httpx.get(f"{url}/health").status_code == 200
        for path in ("/v1/models", "/ready", "/metrics"):
            r = httpx.get(f"{url}{path}")
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert httpx.get(f"{url}/v1/models", headers={"authorization": "Bearer sk-wrong"}).status_code == 401
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-two", max_retries=0)
        assert client.chat.completions.create(model="small", messages=MESSAGES).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="sk-nope", max_retries=0).models.list()


def test_rate_limit_answers_429_with_retry_after(
        urls, tmp_path: Path, tiny_scorer_cfg: ScorerConfig, tiny_extractor: FeatureExtractor) -> None:
    settings = make_settings(tmp_path, tiny_scorer_cfg, tiny_extractor.info, *urls,
                             auth={"api_keys": ["sk-one"], "rate_limit_per_minute": 6, "rate_limit_burst": 2})
    with running_gateway(settings) as url:
        headers = {"authorization": "Bearer sk-one"}
        statuses = [httpx.get(f"{url}/v1/models", headers=headers).status_code for _ in range(3)]
        assert statuses == [200, 200, 429]
        r = httpx.get(f"{url}/v1/models", headers=headers)
        assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 10


def test_token_bucket_refills_at_its_rate() -> None:
    now = [0.0]
    bucket = TokenBucket(rate_per_s=0.5, burst=1, clock=lambda: now[0])
    assert bucket.take() == 0
    assert bucket.take() == pytest.approx(2.0)
    now[0] = 2.0
    assert bucket.take() == 0


def test_metrics_can_move_to_an_internal_port(
        urls, tmp_path: Path, tiny_scorer_cfg: ScorerConfig, tiny_extractor: FeatureExtractor) -> None:
    settings = make_settings(tmp_path, tiny_scorer_cfg, tiny_extractor.info, *urls,
                             server={"metrics_port": 9999}, auth={"api_keys": ["sk-one"]})
    app = create_app(settings, load_probe_groups(settings))
    with serve(app) as url, serve(create_metrics_app(app)) as metrics_url:
        headers = {"authorization": "Bearer sk-one"}
        assert httpx.get(f"{url}/metrics", headers=headers).status_code == 404
        httpx.post(f"{url}/v1/chat/completions", json={"model": "small", "messages": MESSAGES}, headers=headers)
        time.sleep(0.05)
        assert metric(metrics_url, 'router_requests_total{backend="small"') == 1
