"""Learning from traffic through two gateway replicas that share a real redis-server, a labelled-example store and
a probe registry (router.learning.live): answers rated on the replica that did not give them become labelled
examples with the features the other replica kept; the learner (one replica, by its lock) promotes a recalibrated
probe when the ratings say the served one is overconfident; both replicas serve it within seconds; a rollback
through ``python -m router probes rollback`` is served again by both; a key that may not rate teaches nothing.

The backends are fakes (what they answer is not under test); the scorer is the tiny test model."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from router.config import ScorerConfig
from router.learning import ExampleStore, Registry
from router.scorer.features import FeatureExtractor
from scripts.redis_server import redis_server
from tests.support.servers import FakeBackend, free_port, serve
from tests.support.stack import make_settings, metric, running_gateway

pytestmark = pytest.mark.integration

REQUESTS = 160
RIGHT = {"large": 0.15, "small": 0.6}  # how often each backend's answers are rated right (the probes say .95/.70)


@pytest.fixture
def backends() -> Iterator[tuple[str, str]]:
    with serve(FakeBackend("org/small").app) as small_url, serve(FakeBackend("org/large").app) as large_url:
        yield small_url, large_url


def _wait_for(check, timeout_s: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "not within the time allowed"
        time.sleep(0.2)


def _served_version(url: str, backend: str) -> float:
    return metric(url, f'router_probe_version{{backend="{backend}"}}')


def test_ratings_on_either_replica_teach_the_probes_both_serve_and_roll_back(
        backends: tuple[str, str], tmp_path: Path, tiny_scorer_cfg: ScorerConfig,
        tiny_extractor: FeatureExtractor) -> None:
    state = tmp_path / "learning"
    learning = {"enabled": True, "store": str(state / "examples.sqlite3"), "registry": str(state / "registry"),
                "refit_every_labels": 20, "refit_interval_s": 0.5, "reload_interval_s": 0.2, "min_labels": 20,
                "guard_min_labels": 10, "guard_z": 0.0, "candidates": ["recalibrate"]}
    rng = random.Random(0)
    with ExitStack() as stack:
        redis = stack.enter_context(redis_server(tmp_path / "redis", free_port()))
        settings = make_settings(tmp_path, tiny_scorer_cfg, tiny_extractor.info, *backends, learning=learning,
                                 policy={"explore": 0.1}, state={"redis_url": redis.url})
        urls = [stack.enter_context(running_gateway(settings)) for _ in range(2)]
        assert [_served_version(u, "large") for u in urls] == [1, 1]  # the configured probes, imported as v1
        sent: dict[str, int] = {}
        with httpx.Client(timeout=30) as client:
            for i in range(REQUESTS):
                asked, rater = urls[i % 2], urls[(i + 1) % 2]  # rated on the other replica
                r = client.post(f"{asked}/v1/chat/completions", json={
                    "model": "router", "messages": [{"role": "user", "content": f"Question {i}: what is {i} + 1?"}]})
                assert r.status_code == 200
                backend = r.headers["x-router-backend"]
                sent[backend] = sent.get(backend, 0) + 1
                rated = client.post(f"{rater}/v1/feedback", json={
                    "id": r.headers["x-router-request-id"], "correct": rng.random() < RIGHT[backend]})
                assert rated.status_code == 200
            assert sent.get("small", 0) > 0  # explored (the policy sends everything to large: 0.70 < 0.8)

            # both replicas serve the learner's version of large within seconds of its promotion
            _wait_for(lambda: all(_served_version(u, "large") >= 2 for u in urls))
            # the learner's replica shows the promoted probe's guard figures
            assert sum(metric(u, 'router_learning_guard{backend="large",measure="ece"}') for u in urls) < 0.2
            assert sum(metric(u, 'router_learning_refits_total{backend="large",result="promoted"}') for u in urls) >= 1
            route = {"model": "router", "messages": [{"role": "user", "content": "What is 40 + 2?"}]}
            for url in urls:  # recalibrated toward its realised 0.15 (it served 0.95)
                assert client.post(f"{url}/v1/route", json=route).json()["estimates"]["large"] < 0.6

            Registry(state / "registry").rollback("large", "v1")  # what `python -m router probes rollback` does
            _wait_for(lambda: all(_served_version(u, "large") == 1 for u in urls))
            for url in urls:
                assert client.post(f"{url}/v1/route", json=route).json()["estimates"]["large"] == pytest.approx(0.95)
    with ExampleStore(state / "examples.sqlite3") as store:
        examples = store.recent("large", 1000) + store.recent("small", 1000)
    assert len(examples) == REQUESTS  # every rating joined with what the probe saw, whichever replica kept it
    assert {len(e.observation.vector) for e in examples} == {tiny_extractor.info.feature_dim}
    explored = [e for e in examples if e.observation.backend != e.observation.chosen]
    assert explored and all(e.observation.propensity == pytest.approx(0.1) for e in explored)
    kept = [e for e in examples if e.observation.backend == e.observation.chosen]
    assert all(e.observation.propensity == pytest.approx(0.9) for e in kept)


def test_a_target_is_held_from_the_whole_fleets_decisions(
        backends: tuple[str, str], tmp_path: Path, tiny_scorer_cfg: ScorerConfig,
        tiny_extractor: FeatureExtractor) -> None:
    """Only replica A is asked; replica B moves its threshold from the window they share in Redis."""
    target = {"kind": "dear_share", "value": 0.0, "min_requests": 20, "refresh_s": 0.2, "gain": 0.0}
    with ExitStack() as stack:
        redis = stack.enter_context(redis_server(tmp_path / "redis", free_port()))
        settings = make_settings(tmp_path, tiny_scorer_cfg, tiny_extractor.info, *backends,
                                 policy={"target": target}, state={"redis_url": redis.url})
        a, b = (stack.enter_context(running_gateway(settings)) for _ in range(2))
        assert metric(b, "router_policy_threshold") == pytest.approx(0.8)  # the configured one, to begin with
        with httpx.Client(timeout=30) as client:
            for i in range(30):  # the policy sends all to large (0.70 < 0.8): a dear share of 1, not the target's 0
                r = client.post(f"{a}/v1/chat/completions", json={
                    "model": "router", "messages": [{"role": "user", "content": f"What is {i} + 1?"}]})
                assert r.status_code == 200
            _wait_for(lambda: metric(b, "router_policy_threshold") <= 0.70)
            r = client.post(f"{b}/v1/chat/completions", json={
                "model": "router", "messages": [{"role": "user", "content": "What is 1 + 1?"}]})
            assert r.headers["x-router-backend"] == "small"  # B holds the fleet's target without traffic of its own
            # all to large until the threshold moved; A reads B's decision back from the shared window within
            # refresh_s (on a slow machine A's 30 may all have gone to large before A's first read)
            _wait_for(lambda: 0 < metric(a, "router_policy_target_realised") < 1, timeout_s=10.0)
