"""The cascade in routing: each request is decided by the cheapest stage whose decision is clear (the score cache,
the text-only models, the early block, the full pass), the stage is said, and the decision is the full probes'
wherever a stage is clear."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from probes.fit import fit_text_features
from router.config import ScoreCacheConfig, ScorerConfig
from router.metrics import Metrics
from router.probe import Probe, ProbeSet, load_probe, save_probe, scorer_block
from router.request import Resolver
from router.routing import ProbeGroup, Router
from router.score_cache import ScoreCache
from router.scorer.interface import EarlyExit, Scored
from router.scorer.recipe import Message, ScorerInfo
from tests.support.fakes import ViewEncoder
from tests.support.stack import make_settings

INFO = ScorerInfo(model="m", layers=(4,), pooling="last", final_norm=True, hidden_size=2, feature_dim=2,
                  fingerprint="full")
EARLY = ScorerInfo(model="m", layers=(2,), pooling="last", final_norm=True, hidden_size=2, feature_dim=2,
                   fingerprint="early")
TEXT = fit_text_features(["what is two plus two", "how far does the train go"], min_df=1)


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def staged_probe(full: float, text: float, early: float, margins: dict[str, float]) -> Probe:
    """Constant estimates at every stage (zero weights, a bias), with the margins each stage decides with."""
    def constant(p: float, dim: int, **kw: object) -> Probe:
        return Probe(np.zeros(dim), np.ones(dim), np.zeros(dim), _logit(p), **kw)  # type: ignore[arg-type]

    cascade = {"margins": margins, "policy": {"mode": "threshold", "threshold": 0.8}}
    return Probe(np.zeros(2), np.ones(2), np.zeros(2), _logit(full), scorer=scorer_block(INFO),
                 stages={"text": constant(text, TEXT.dim, text=TEXT), "early": constant(early, 2,
                                                                                          scorer=scorer_block(EARLY))},
                 cascade=cascade)


class StagedScorer:
    """Honours an early exit: asks ``should_stop`` of zero early features, as a local packed pass would."""

    info = INFO

    def __init__(self, encoder: object) -> None:
        self.encoder = encoder
        self.calls: list[str] = []

    async def score(self, messages: Sequence[Message], timeout_s: float | None = None, *, key: str = "",
                    early: EarlyExit | None = None, ids: Sequence[int] | None = None) -> Scored:
        x = np.zeros(2, dtype=np.float32)
        stopped = early is not None and early.should_stop(x)
        self.calls.append("early" if stopped else "full")
        return Scored(None if stopped else x, prompt_tokens=5, queue_s=0.0, total_s=0.001,
                      early=x if early is not None else None, stopped=stopped)

    def early_exit_info(self, layer: int) -> ScorerInfo | None:
        return EARLY if layer == 2 else None


def _router(tmp_path: Path, small: Probe, large: Probe, *, cascade: bool = True, cache: bool = False
            ) -> tuple[Router, StagedScorer]:
    settings = make_settings(tmp_path, ScorerConfig(model=str(tmp_path)), INFO, "http://127.0.0.1:9",
                             "http://127.0.0.1:9", policy={"cascade": {"enabled": cascade, "early_layer": 2}})
    paths = {"small": save_probe(small, tmp_path / "s.json"), "large": save_probe(large, tmp_path / "l.json")}
    settings = settings.model_copy(update={"backends": [b.model_copy(update={"probe": paths[b.name]})
                                                        for b in settings.backends]})
    scorer = StagedScorer(ViewEncoder())
    probes = ProbeSet(["small", "large"], [load_probe(paths["small"]), load_probe(paths["large"])])
    score_cache = ScoreCache(ScoreCacheConfig(entries=16 if cache else 0))
    group = ProbeGroup(scorer, probes, early_exit=True)  # type: ignore[arg-type]
    return Router(settings, [group], Metrics(), score_cache), scorer


def ask(router: Router, client: str = "k", text: str = "what is two plus two"):
    request = Resolver(router.policy).routable("router", [{"role": "user", "content": text}], prompt_tokens=5,
                                               max_tokens=None, threshold=None, client=client, backends=None)
    return asyncio.run(router.route(request, available={"small", "large"}))


MARGINS = {"text": 0.05, "early": 0.05}


def test_a_clear_text_estimate_decides_without_a_scorer_pass(tmp_path: Path) -> None:
    # small's text estimate 0.95 is 0.15 above the threshold 0.8: clear at margin 0.05
    router, scorer = _router(tmp_path, staged_probe(0.9, 0.95, 0.9, MARGINS), staged_probe(0.97, 0.97, 0.97, MARGINS))
    routed = ask(router)
    assert routed.decision.backend == "small" and routed.estimate is not None and routed.estimate.stage == "text"
    assert scorer.calls == [] and routed.probabilities["small"] == pytest.approx(0.95)


def test_an_unclear_text_estimate_asks_the_early_block_which_stops_the_pass(tmp_path: Path) -> None:
    router, scorer = _router(tmp_path, staged_probe(0.9, 0.82, 0.6, MARGINS), staged_probe(0.97, 0.97, 0.97, MARGINS))
    routed = ask(router)
    assert routed.estimate is not None and routed.estimate.stage == "early" and scorer.calls == ["early"]
    assert routed.decision.backend == "large"  # small's early 0.6 is far below 0.8


def test_unclear_everywhere_runs_the_full_pass(tmp_path: Path) -> None:
    router, scorer = _router(tmp_path, staged_probe(0.9, 0.81, 0.79, MARGINS), staged_probe(0.97, 0.97, 0.97, MARGINS))
    routed = ask(router)
    assert routed.estimate is not None and routed.estimate.stage == "scorer" and scorer.calls == ["full"]
    assert routed.decision.backend == "small" and routed.probabilities["small"] == pytest.approx(0.9)
    assert router.metrics.decision_stage.labels("scorer")._value.get() == 1


def test_cascade_off_always_runs_the_full_pass(tmp_path: Path) -> None:
    router, scorer = _router(tmp_path, staged_probe(0.9, 0.95, 0.9, MARGINS), staged_probe(0.97, 0.97, 0.97, MARGINS),
                             cascade=False)
    assert ask(router).estimate.stage == "scorer" and scorer.calls == ["full"]  # type: ignore[union-attr]


def test_a_config_margin_overrides_the_files(tmp_path: Path) -> None:
    router, scorer = _router(tmp_path, staged_probe(0.9, 0.95, 0.9, MARGINS), staged_probe(0.97, 0.97, 0.97, MARGINS))
    router.policy = router.policy.model_copy(update={"cascade": router.policy.cascade.model_copy(
        update={"text_margin": 0.5, "early_margin": 0.5})})
    assert ask(router).estimate.stage == "scorer" and scorer.calls == ["full"]  # type: ignore[union-attr]


def test_a_repeated_prompt_is_a_cache_hit_for_its_key_only(tmp_path: Path) -> None:
    router, scorer = _router(tmp_path, staged_probe(0.9, 0.81, 0.79, MARGINS), staged_probe(0.97, 0.97, 0.97, MARGINS),
                             cache=True)
    first, again, other = ask(router, "a"), ask(router, "a"), ask(router, "b")
    assert [r.estimate.stage for r in (first, again, other)] == ["scorer", "cache", "scorer"]  # type: ignore[union-attr]
    assert again.decision == first.decision and scorer.calls == ["full", "full"]
