"""Two gateway replicas sharing a real redis-server: feedback answerable by either, rate limits counted across
both; Redis stopped (no 5xx: each replica falls back to its own memory, and the metrics say so) and restarted."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client import CollectorRegistry

from router.config import ScorerConfig, StateConfig
from router.limits import LocalLimiter
from router.scorer.features import FeatureExtractor
from router.state import RedisLimiter, RedisState
from scripts.redis_server import RedisServer
from tests.support.servers import FakeBackend, serve
from tests.support.stack import make_settings, metric, running_gateway

MESSAGES = [{"role": "user", "content": "What is 2 + 2?"}]
RETRY_AFTER_S = 0.5


@pytest.fixture
def start_replicas(redis: RedisServer, tmp_path: Path, tiny_scorer_cfg: ScorerConfig,
                   tiny_extractor: FeatureExtractor) -> Iterator[Callable[..., tuple[str, str]]]:
    """Two gateways (the same config, as replicas have) in front of the same two fake backends."""
    with ExitStack() as stack:
        small = stack.enter_context(serve(FakeBackend("org/small").app))
        large = stack.enter_context(serve(FakeBackend("org/large").app))

        def start(**sections: dict[str, object]) -> tuple[str, str]:
            settings = make_settings(tmp_path, tiny_scorer_cfg, tiny_extractor.info, small, large,
                                     state={"redis_url": redis.url, "retry_after_s": RETRY_AFTER_S}, **sections)
            return stack.enter_context(running_gateway(settings)), stack.enter_context(running_gateway(settings))

        yield start


def _ask(url: str, stream: bool = False) -> str:
    """A routed answer's id for feedback: the request id, or for a stream the backend's completion id."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    if stream:
        return next(chunk.id for chunk in client.chat.completions.create(model="router", messages=MESSAGES,
                                                                         stream=True))
    raw = client.chat.completions.with_raw_response.create(model="router", messages=MESSAGES)
    return raw.headers["x-router-request-id"]


def _rate(url: str, answer_id: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/feedback", json={"id": answer_id, "correct": True})


def _models(url: str) -> int:
    return httpx.get(f"{url}/v1/models", headers={"authorization": "Bearer sk-one"}).status_code


def test_feedback_is_answerable_by_any_replica_and_counts_once(start_replicas) -> None:  # type: ignore[no-untyped-def]
    a, b = start_replicas()
    request_id = _ask(a)
    rated = _rate(b, request_id)
    assert rated.status_code == 200 and rated.json()["backend"] == "large"
    assert _rate(a, request_id).status_code == 404  # rated once, whichever replica is asked
    completion_id = _ask(b, stream=True)
    deadline = time.monotonic() + 2
    while (r := _rate(a, completion_id)).status_code == 404 and time.monotonic() < deadline:
        time.sleep(0.01)  # a stream's record is written as its last bytes go out: a race of a few ms at most
    assert r.status_code == 200
    assert metric(a, "router_feedback_total") == 1 and metric(b, "router_feedback_total") == 1
    assert metric(a, "router_state_up") == 1 and metric(a, "router_state_errors_total") == 0


LIMITED = {"auth": {"api_keys": ["sk-one"], "rate_limit_per_minute": 6, "rate_limit_burst": 4}}


def test_rate_limits_are_counted_across_replicas(start_replicas) -> None:  # type: ignore[no-untyped-def]
    a, b = start_replicas(**LIMITED)
    assert [_models(url) for url in (a, b, a, b, a, b)] == [200, 200, 200, 200, 429, 429]  # 4 for the key in all
    r = httpx.get(f"{b}/v1/models", headers={"authorization": "Bearer sk-one"})
    assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 10


def test_without_redis_each_replica_limits_alone(redis: RedisServer, start_replicas) -> None:  # type: ignore[no-untyped-def]
    a, b = start_replicas(**LIMITED)
    redis.stop()
    # Neither open nor closed: each replica counts the key's burst in its own memory (N replicas, N x the limit).
    assert [_models(a) for _ in range(5)] == [200, 200, 200, 200, 429]
    assert [_models(b) for _ in range(5)] == [200, 200, 200, 200, 429]


def test_redis_stopped_and_restarted(redis: RedisServer, start_replicas) -> None:  # type: ignore[no-untyped-def]
    a, b = start_replicas()
    lost = _ask(a)  # kept only in the Redis about to stop (no persistence here)
    redis.stop()
    during = _ask(a)  # answered (no 5xx); remembered in replica a's memory instead
    assert _rate(b, during).status_code == 404  # replica b cannot know it now
    assert _rate(a, during).status_code == 200
    assert _rate(b, lost).status_code == 404
    assert metric(a, "router_state_up") == 0 and metric(b, "router_state_up") == 0
    assert metric(a, 'router_state_errors_total{op="remember"}') >= 1
    redis.start()
    time.sleep(RETRY_AFTER_S + 0.1)  # each replica tries Redis again after state.retry_after_s
    after = _ask(b)
    assert _rate(a, after).status_code == 200  # shared again
    assert _rate(a, lost).status_code == 404  # it went with the stopped Redis
    assert metric(a, "router_state_up") == 1 and metric(b, "router_state_up") == 1


def test_the_redis_bucket_takes_refills_and_gives_back(redis: RedisServer) -> None:
    """The Lua token bucket that counts for every replica: what a request takes, its wait, a give-back (a token
    budget settled on the backend's real usage) and a charge below zero."""
    async def run() -> list[float]:
        registry = CollectorRegistry()
        state = RedisState(StateConfig(redis_url=redis.url), registry)
        limiter = RedisLimiter(state, LocalLimiter())
        try:
            waits = [await limiter.take("t", 10.0, 100, 60), await limiter.take("t", 10.0, 100, 60)]
            await limiter.adjust("t", 10.0, 100, 50)  # 50 given back: 90 or so now
            waits.append(await limiter.take("t", 10.0, 100, 80))
            await limiter.adjust("t", 10.0, 100, -200)  # charged more than it has
            waits.append(await limiter.take("t", 10.0, 100, 1))
            return waits
        finally:
            await state.aclose()

    first, second, after_give_back, after_charge = asyncio.run(run())
    assert first == 0 and second == pytest.approx(2.0, abs=0.1)  # 40 left, 20 missing at 10/s
    assert after_give_back == 0
    assert after_charge == pytest.approx(19.1, abs=0.2)  # about -190 tokens: 191 missing at 10/s
