"""The scorer on a real vLLM CPU pooling server: the same features, probabilities and routes as the in-process
scorer; a gateway that routes with it; a backend scored by its own model (a self-probe), end to end."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import openai
import pytest

from probes.data import load_dataset
from probes.train import train_probes
from router.app import create_app
from router.edge import server_options
from router.policy import Option, choose_by_threshold
from router.routing import load_probe_groups
from router.scorer.interface import Scorer
from router.scorer.local import LocalScorer
from router.scorer.vllm import VllmScorer
from scripts.vllm_cpu import wait_ready
from tests.conftest import ROOT
from tests.integration.conftest import Pool, ScorerServer, scorer_server
from tests.support.servers import serve

pytestmark = pytest.mark.integration

QUESTIONS = 64


def gsm8k(n: int) -> list[dict]:
    with (ROOT / "data" / "gsm8k_test_qwen25math.jsonl").open() as f:
        return [json.loads(line) for _, line in zip(range(n), f, strict=False)]


async def features(scorer: Scorer, conversations: Sequence[list[dict[str, str]]]) -> np.ndarray:
    await scorer.start()
    try:
        scored = await asyncio.gather(*(scorer.score(c) for c in conversations))
    finally:
        await scorer.aclose()
    return np.stack([s.features for s in scored])


def test_local_and_vllm_scorers_agree_on_features_probabilities_and_routes(vllm_pool: Pool,
                                                                          vllm_scorer: ScorerServer) -> None:
    conversations = [[{"role": "user", "content": r["question"]}] for r in gsm8k(QUESTIONS)]
    # float32 on both sides: the implementations are compared, not bf16's rounding, which alone moves p by up to
    # 0.02 on these questions (local bf16 against local float32) and by 0.033 between the two in bf16
    local = LocalScorer.load(vllm_pool.settings.scorer.model_copy(update={"dtype": "float32"}))
    remote = VllmScorer(vllm_scorer.cfg)
    assert vllm_scorer.cfg.dtype == "float32"
    assert remote.info == local.info  # one recipe, one fingerprint: the shipped probes load on both
    x_local = asyncio.run(features(local, conversations))
    x_remote = asyncio.run(features(remote, conversations))
    cosine = (x_local * x_remote).sum(1) / np.linalg.norm(x_local, axis=1) / np.linalg.norm(x_remote, axis=1)
    assert cosine.min() >= 0.999, cosine.min()

    (group,) = load_probe_groups(vllm_pool.settings)
    settings = vllm_pool.settings
    threshold = settings.policy.threshold
    gap, same_route, near = 0.0, 0, 0
    for xa, xb in zip(x_local, x_remote, strict=True):
        pa, pb = group.probes.predict(xa), group.probes.predict(xb)
        gap = max(gap, *(abs(pa[n] - pb[n]) for n in pa))
        routes = [choose_by_threshold([Option(b.name, b.output_cost_per_mtok, p[b.name]) for b in settings.backends],
                                      threshold, settings.policy.fallback).backend for p in (pa, pb)]
        same_route += routes[0] == routes[1]
        near += min(abs(p - threshold) for p in pa.values()) < 0.01
    assert gap <= 0.01, gap
    assert same_route >= QUESTIONS - near  # a route may differ only where an estimate sits on the threshold
    print(f"\nlocal vs vLLM scorer on {QUESTIONS} GSM8K questions: min cosine {cosine.min():.5f}, max |Δp| {gap:.4f}, "
          f"{same_route}/{QUESTIONS} same routes")


def test_last_plus_mean_from_a_vllm_server_equals_the_local_scorer(vllm_pool: Pool, tmp_path: Path) -> None:
    """The MATH pool's recipe (block 6, last+mean): vLLM returns every token's state, the gateway pools them."""
    cfg = vllm_pool.settings.scorer.model_copy(update={"layers": [6], "pooling": "last+mean", "dtype": "float32"})
    server = scorer_server(cfg, tmp_path)
    try:
        wait_ready([server.server], timeout_s=600)
        conversations = [[{"role": "user", "content": r["question"]}] for r in gsm8k(16)]
        local = LocalScorer.load(cfg)
        remote = VllmScorer(server.cfg)
        assert remote.info == local.info and remote.info.feature_dim == 2 * 576
        x_local = asyncio.run(features(local, conversations))
        x_remote = asyncio.run(features(remote, conversations))
    finally:
        server.server.stop()
    for half in (slice(0, 576), slice(576, None)):  # the last token's state, then the mean over the prompt
        a, b = x_local[:, half], x_remote[:, half]
        cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        assert cosine.min() >= 0.999, cosine.min()


def test_a_gateway_routes_with_the_vllm_scorer(vllm_pool: Pool, vllm_scorer: ScorerServer) -> None:
    settings = vllm_pool.settings.model_copy(update={"scorer": vllm_scorer.cfg})
    groups = load_probe_groups(settings)
    assert [type(g.scorer) for g in groups] == [VllmScorer]
    with serve(create_app(settings, groups), **server_options(settings.server)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        for threshold, backend in (("0", "qwen2.5-math-1.5b"), ("1", "qwen2.5-math-7b")):
            raw = client.chat.completions.with_raw_response.create(
                model="router", max_tokens=4, messages=[{"role": "user", "content": "What is 17*23?"}],
                extra_headers={"x-router-threshold": threshold})
            assert raw.headers["x-router-backend"] == backend
            assert raw.headers["x-router-reason"] in ("threshold_met", "fallback")
            assert float(raw.headers["x-router-scorer-ms"]) > 0
            assert raw.parse().choices[0].message.content is not None


def test_a_backend_scored_by_its_own_model_routes_end_to_end(vllm_pool: Pool, vllm_scorer: ScorerServer,
                                                            tmp_path: Path) -> None:
    """The cheap backend reads its own model's layer 24 (a second pooling server), trained on its real labels."""
    records = gsm8k(QUESTIONS)
    data = tmp_path / "gsm8k-64.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    own = scorer_server(vllm_pool.settings.scorer.model_copy(update={"layers": [24]}), tmp_path)
    try:
        wait_ready([own.server], timeout_s=600)
        cheap, dear = vllm_pool.settings.backends
        cheap = cheap.model_copy(update={"scorer": own.cfg, "probe": tmp_path / "own" / f"{cheap.name}.json"})
        settings = vllm_pool.settings.model_copy(update={"scorer": vllm_scorer.cfg, "backends": [cheap, dear]})
        # 64 questions are too few to clear the guard rails (probes.guards): forced, as this checks the plumbing
        trained = train_probes(settings.model_copy(update={"backends": [cheap]}), load_dataset(data),
                               out_dir=tmp_path / "own", folds=3, progress=False, force=True)  # the layer-24 server
        assert set(trained.written) == {cheap.name}
        groups = load_probe_groups(settings)
        assert sorted(len(g.probes.names) for g in groups) == [1, 1]  # two scorers, one probe each
        self_group = next(g for g in groups if cheap.name in g.probes.names)
        assert self_group.scorer.info.layers == (24,)
        question = [{"role": "user", "content": records[0]["question"]}]
        expected = self_group.probes.predict(asyncio.run(features(VllmScorer(own.cfg), [question]))[0])[cheap.name]
        with serve(create_app(settings, groups), **server_options(settings.server)) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            raw = client.chat.completions.with_raw_response.create(
                model="router", max_tokens=4, messages=question, extra_headers={"x-router-threshold": "0"})
            assert raw.headers["x-router-backend"] == cheap.name  # everything clears 0: the cheapest
            assert float(raw.headers["x-router-p-success"]) == pytest.approx(expected, abs=0.01)
    finally:
        own.server.stop()
