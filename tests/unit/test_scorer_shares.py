"""Each key's share of the scorer, as routing sees it: the request's key reaches the scorer (which shares its passes
among keys by tokens, tests/unit/test_scorer_fair.py), and a scorer that refuses a key routes it unscored."""

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
from router.scorer.interface import Scored, ScorerUnavailable
from router.scorer.recipe import Message, ScorerInfo
from tests.support.fakes import ViewEncoder
from tests.support.stack import make_settings

INFO = ScorerInfo(model="m", layers=(2,), pooling="last", final_norm=True, hidden_size=4, feature_dim=4,
                  fingerprint="f")


class KeyedScorer:
    """Remembers whose prompts it scored; refuses the key named ``refuse`` as over its share."""

    info = INFO
    encoder = ViewEncoder()

    def __init__(self, refuse: str = "") -> None:
        self.keys: list[str] = []
        self.refuse = refuse

    async def score(self, messages: Sequence[Message], timeout_s: float | None = None, *, key: str = "",
                    **_: object) -> Scored:
        if key == self.refuse:
            raise ScorerUnavailable("key_share", f"key {key} is over its share")
        self.keys.append(key)
        return Scored(np.zeros(4, dtype=np.float32), prompt_tokens=3, queue_s=0.0, total_s=0.001)


def router(tmp_path: Path, scorer: KeyedScorer) -> Router:
    settings = make_settings(tmp_path, ScorerConfig(model=str(tmp_path)), INFO, "http://127.0.0.1:9",
                             "http://127.0.0.1:9")
    probes = ProbeSet([b.name for b in settings.backends], [load_probe(b.probe) for b in settings.backends])
    return Router(settings, [ProbeGroup(scorer, probes)], Metrics())  # type: ignore[list-item]


def ask(r: Router, text: str, client: str):
    request = Resolver(r.policy).routable("router", [{"role": "user", "content": text}], prompt_tokens=3,
                                          max_tokens=None, threshold=None, client=client, backends=None)
    return asyncio.run(r.route(request, available={"small", "large"}))


def test_the_requests_key_reaches_the_scorer(tmp_path: Path) -> None:
    scorer = KeyedScorer()
    r = router(tmp_path, scorer)
    assert ask(r, "a0", "a").decision.reason == "threshold_met"
    assert ask(r, "b0", "b").decision.reason == "threshold_met"
    assert scorer.keys == ["a", "b"]


def test_a_key_over_its_share_routes_unscored_and_says_why(tmp_path: Path) -> None:
    r = router(tmp_path, KeyedScorer(refuse="a"))
    assert ask(r, "a0", "a").decision.reason == "unscored"
    assert r.metrics.scorer_errors.labels("key_share")._value.get() == 1
    assert ask(r, "b0", "b").decision.reason == "threshold_met"
