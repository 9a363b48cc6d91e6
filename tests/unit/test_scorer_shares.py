"""Each key's share of the scorer (routing.ScorerShares through Router.route), with a scorer we hold by hand."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from router.config import ScorerConfig
from router.metrics import Metrics
from router.probe import ProbeSet, load_probe
from router.request import Resolver
from router.routing import ProbeGroup, Router
from router.scorer.interface import Scored
from router.scorer.recipe import Message, ScorerInfo
from tests.support.stack import make_settings

INFO = ScorerInfo(model="m", layers=(2,), pooling="last", final_norm=True, hidden_size=4, feature_dim=4,
                  fingerprint="f")


class HeldScorer:
    """Scores only when released; remembers whose prompts it started on."""

    info = INFO
    encoder = None

    def __init__(self) -> None:
        self.started: list[str] = []
        self.release = asyncio.Event()

    async def score(self, messages: Sequence[Message], timeout_s: float | None = None) -> Scored:
        self.started.append(str(messages[0]["content"]))
        await self.release.wait()
        return Scored(np.zeros(4, dtype=np.float32), prompt_tokens=3, queue_s=0.0, total_s=0.001)


def router(tmp_path: Path, per_key: int, timeout_s: float) -> tuple[Router, HeldScorer]:
    cfg = ScorerConfig(model=str(tmp_path), max_in_flight_per_key=per_key, timeout_s=timeout_s)
    settings = make_settings(tmp_path, cfg, INFO, "http://127.0.0.1:9", "http://127.0.0.1:9")
    scorer = HeldScorer()
    probes = ProbeSet([b.name for b in settings.backends], [load_probe(b.probe) for b in settings.backends])
    return Router(settings, [ProbeGroup(scorer, probes)], Metrics()), scorer  # type: ignore[list-item]


def ask(r: Router, text: str, client: str) -> asyncio.Task:
    request = Resolver(r.policy).routable("router", [{"role": "user", "content": text}], prompt_tokens=3,
                                          max_tokens=None, threshold=None, client=client, backends=None)
    return asyncio.create_task(r.route(request, available={"small", "large"}))


async def test_a_key_that_floods_the_scorer_waits_for_its_own_turn(tmp_path: Path) -> None:
    r, scorer = router(tmp_path, per_key=2, timeout_s=10)
    flood = [ask(r, f"a{i}", "a") for i in range(6)]
    await asyncio.sleep(0.01)
    other = ask(r, "b0", "b")
    await asyncio.sleep(0.01)
    assert scorer.started == ["a0", "a1", "b0"]  # a's four others wait for a's slots; b goes straight in
    scorer.release.set()
    routed = await asyncio.gather(*flood, other)
    assert all(x.decision.reason == "threshold_met" for x in routed)
    assert sorted(scorer.started) == ["a0", "a1", "a2", "a3", "a4", "a5", "b0"]


async def test_a_turn_that_never_comes_routes_unscored_and_says_why(tmp_path: Path) -> None:
    r, scorer = router(tmp_path, per_key=1, timeout_s=0.05)
    first = ask(r, "a0", "a")
    await asyncio.sleep(0.01)
    second = await ask(r, "a1", "a")
    assert second.decision.reason == "unscored"
    assert r.metrics.scorer_errors.labels("key_share")._value.get() == 1
    scorer.release.set()
    assert (await first).decision.reason in ("unscored", "threshold_met")
