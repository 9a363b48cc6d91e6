"""Learning wired into routing (router.routing, router.learning.live): exploration's propensities and bounds, the
target's controller fed by routed decisions, probes served in place, what an answer keeps for its rating and how
a rating becomes a labelled example (including a request the cascade decided without the full pass)."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from router.config import ScorerConfig
from router.feedback import Answered
from router.learning import ExampleStore, Observation, Registry, ThresholdController
from router.learning.live import LearnerLock, LiveLearning
from router.metrics import Metrics
from router.policy import Reason, Stage
from router.probe import ProbeSet, load_probe
from router.request import Resolver
from router.routing import Estimate, ProbeGroup, Routed, Router
from router.scorer.interface import Scored
from router.scorer.recipe import ScorerInfo
from tests.support.fakes import ViewEncoder
from tests.support.probes import constant_probe
from tests.support.stack import make_settings

INFO = ScorerInfo(model="m", layers=(2,), pooling="last", final_norm=True, hidden_size=4, feature_dim=4,
                  fingerprint="f")
QUESTION = [{"role": "user", "content": "What is 2 + 2?"}]


class _Scorer:
    info = INFO
    encoder = ViewEncoder()

    def __init__(self) -> None:
        self.calls = 0

    async def score(self, messages: object, timeout_s: float | None = None, **_: object) -> Scored:
        self.calls += 1
        return Scored(np.arange(4, dtype=np.float32), prompt_tokens=3, queue_s=0.0, total_s=0.001)


def _router(tmp_path: Path, **sections: object) -> tuple[Router, _Scorer]:
    settings = make_settings(tmp_path, ScorerConfig(model=str(tmp_path)), INFO, "http://127.0.0.1:9",
                             "http://127.0.0.1:9", **sections)  # type: ignore[arg-type]
    probes = ProbeSet([b.name for b in settings.backends], [load_probe(b.probe) for b in settings.backends])
    scorer = _Scorer()
    target = None
    if settings.policy.target is not None:
        t = settings.policy.target
        target = ThresholdController(t.kind, t.value, initial=settings.policy.threshold, window=t.window,
                                     min_entries=t.min_requests, gain=0.0, half_life=None)
    router = Router(settings, [ProbeGroup(scorer, probes)], Metrics(), target=target,  # type: ignore[list-item]
                    rng=random.Random(0))
    return router, scorer


def _route(router: Router, backends: frozenset[str] | None = None, threshold: float | None = None) -> Routed:
    resolver = Resolver(router.policy, threshold=router.target.threshold if router.target is not None else None)
    request = resolver.routable("router", QUESTION, prompt_tokens=3, max_tokens=None, threshold=threshold,
                                client="k", backends=backends)
    return asyncio.run(router.route(request, available={"small", "large"}))


def test_exploration_sends_its_share_elsewhere_with_its_propensity_never_outside_the_key(tmp_path: Path) -> None:
    router, _ = _router(tmp_path, policy={"explore": 0.2})  # the policy sends everything to large (0.70 < 0.8)
    routed = [_route(router) for _ in range(2000)]
    sent = Counter(r.decision.backend for r in routed)
    assert 0.17 < sent["small"] / 2000 < 0.23
    for r in routed:
        assert r.chosen == "large"
        if r.decision.backend == "small":
            assert r.decision.reason is Reason.EXPLORE and r.propensity == pytest.approx(0.2)
            assert r.decision.order == ("small", "large")  # the policy's order after the explored backend
        else:
            assert r.propensity == pytest.approx(0.8)
    only_large = [_route(router, backends=frozenset({"large"})) for _ in range(200)]
    assert {r.decision.backend for r in only_large} == {"large"} and {r.propensity for r in only_large} == {1.0}
    assert router.metrics.registry.get_sample_value("router_explored_total", {"backend": "small"}) == sent["small"]


def test_the_target_moves_the_threshold_of_requests_that_set_none(tmp_path: Path) -> None:
    # small 0.70, large 0.95: a threshold above 0.70 sends all to large (dear share 1), at most 0.70 none
    router, _ = _router(tmp_path, policy={"target": {"kind": "dear_share", "value": 0.0, "min_requests": 50}})
    assert all(_route(router).decision.backend == "large" for _ in range(60))
    assert router.target is not None and router.target.refresh() <= 0.70
    assert _route(router).decision.backend == "small"  # the controller's threshold, now
    assert _route(router, threshold=0.9).decision.backend == "large"  # a request's own threshold still wins


def test_serve_probes_swaps_a_backend_and_the_version_that_keys_the_cache(tmp_path: Path) -> None:
    router, _ = _router(tmp_path)
    before = router.groups[0].probes.version
    learned = constant_probe(INFO, 0.2)
    learned.training["learning"] = {"kind": "recalibrate"}
    assert router.serve_probes({"large": learned}) == ["large"]
    assert router.groups[0].probes.version != before
    assert _route(router).probabilities == pytest.approx({"small": 0.70, "large": 0.2})


def _live(tmp_path: Path, router: Router, **learning: object) -> LiveLearning:
    cfg = router.settings.model_copy(update={"learning": router.settings.learning.model_copy(update={
        "enabled": True, "store": tmp_path / "examples.sqlite3", "registry": tmp_path / "registry", **learning})})
    return LiveLearning(cfg, router, router.metrics, clock=lambda: 1000.0)


def test_an_answer_keeps_what_the_probe_saw_and_its_rating_becomes_a_labelled_example(tmp_path: Path) -> None:
    router, _ = _router(tmp_path, policy={"explore": 0.2})
    live = _live(tmp_path, router)
    request = Resolver(router.policy).routable("router", QUESTION, prompt_tokens=3, max_tokens=None,
                                               threshold=None, client="k", backends=None)

    async def run() -> list[object]:
        await live.start()
        try:
            routed = await router.route(request, available={"small", "large"})
            kept = live.observation("req-1", request, routed, routed.decision.backend)
            assert kept is not None
            failover = live.observation("req-2", request, routed, "other")  # not where the policy sent it
            live.rated(Answered(routed.decision.backend, None, 0.0, None, "k", kept), 1.0, "k")
            live.rated(Answered("large", None, 0.0, None, "k", None), 0.0, "k")
            await asyncio.gather(*live._pending)
            return [routed, failover]
        finally:
            await live.aclose()

    routed, failover = asyncio.run(run())
    assert failover is None
    with ExampleStore(tmp_path / "examples.sqlite3") as store:
        (example,) = store.recent(routed.decision.backend, 10)
    o = example.observation
    assert example.label == 1.0 and o.key == "k" and o.chosen == "large"
    assert o.propensity == pytest.approx(routed.propensity)
    assert o.versions == {"small": "v1", "large": "v1"} and o.fingerprint == "f"
    assert o.vector.tolist() == [0.0, 1.0, 2.0, 3.0]  # the scorer's features, kept as float16
    metrics = router.metrics.registry
    assert metrics.get_sample_value("router_learning_examples_total",
                                    {"backend": routed.decision.backend, "outcome": "stored"}) == 1
    assert metrics.get_sample_value("router_learning_examples_total",
                                    {"backend": "large", "outcome": "no_observation"}) == 1


def test_a_request_decided_without_the_pass_is_scored_when_rated_and_raters_are_enforced(tmp_path: Path) -> None:
    router, scorer = _router(tmp_path)
    live = _live(tmp_path, router, raters=["k"])
    request = Resolver(router.policy).routable("router", QUESTION, prompt_tokens=3, max_tokens=None,
                                               threshold=None, client="k", backends=None)
    decided = asyncio.run(router.route(request, available={"small", "large"}))
    estimate = Estimate(decided.probabilities, 3, 0.01, (), Stage.TEXT)  # the text stage decided: no features
    routed = Routed(decided.decision, decided.probabilities, 0.01, estimate, chosen="large")

    async def run() -> None:
        await live.start()
        try:
            kept = live.observation("req-1", request, routed, "large")
            assert kept is not None and Observation.from_json(kept).meta["view"] == QUESTION
            calls = scorer.calls
            live.rated(Answered("large", None, 0.0, None, "k", kept), 0.0, "k")
            live.rated(Answered("large", None, 0.0, None, "mallory", kept), 1.0, "mallory")
            await asyncio.gather(*live._pending)
            assert scorer.calls == calls + 1  # scored once, for the rating that teaches
        finally:
            await live.aclose()

    asyncio.run(run())
    with ExampleStore(tmp_path / "examples.sqlite3") as store:
        (example,) = store.recent("large", 10)
    assert example.label == 0.0 and example.observation.vector.tolist() == [0.0, 1.0, 2.0, 3.0]
    assert "view" not in example.observation.meta
    assert router.metrics.registry.get_sample_value("router_learning_examples_total",
                                                    {"backend": "large", "outcome": "not_rater"}) == 1


def test_start_imports_the_configured_probes_and_serves_the_registry_current_version(tmp_path: Path) -> None:
    router, _ = _router(tmp_path)
    registry = Registry(tmp_path / "registry")
    registry.ensure_base("large", router.settings.backend("large").probe)
    registry.promote("large", constant_probe(INFO, 0.5), {"kind": "manual"})
    live = _live(tmp_path, router)

    async def run() -> None:
        await live.start()
        await live.aclose()

    asyncio.run(run())
    assert live.served == {"small": "v1", "large": "v2"}
    assert router.metrics.registry.get_sample_value("router_probe_version", {"backend": "large"}) == 2
    assert _route(router).probabilities["large"] == pytest.approx(0.5)


def test_one_learner_holds_the_lock_until_it_lets_go(tmp_path: Path) -> None:
    a, b = LearnerLock(tmp_path / "lock"), LearnerLock(tmp_path / "lock")
    assert a.acquire() and a.acquire() and not b.acquire()
    a.release()
    assert b.acquire()
    b.release()
