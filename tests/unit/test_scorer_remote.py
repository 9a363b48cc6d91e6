"""The vllm scorer's own logic against a small fake pooling server: the request it sends, what it accepts, and
its circuit; and that a gateway with a remote scorer never loads torch."""

from __future__ import annotations

import asyncio
import base64
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import orjson
import pytest
import yaml
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from router.config import ScorerConfig
from router.scorer.interface import EarlyExit, Scored, ScorerUnavailable
from router.scorer.vllm import VllmScorer
from tests.conftest import ROOT
from tests.support.probes import write_constant_probes
from tests.support.servers import free_port, serve

MESSAGES = [{"role": "user", "content": "What is 2 + 2?"}]


class FakePooling:
    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.received: list[dict] = []
        self.status = 200
        self.gate = threading.Event()  # answers wait for it
        self.gate.set()
        self.app = FastAPI()
        self.app.add_api_route("/v1/embeddings", self.embeddings, methods=["POST"])
        self.app.add_api_route("/pooling", self.pooling, methods=["POST"])
        self.app.add_api_route("/health", lambda: {}, methods=["GET"])

    async def embeddings(self, request: Request) -> JSONResponse:
        body = orjson.loads(await request.body())
        self.received.append(body)
        await asyncio.to_thread(self.gate.wait, 10)
        vector = np.arange(self.dim, dtype="<f4")
        return JSONResponse({"data": [{"embedding": base64.b64encode(vector.tobytes()).decode()}]},
                            status_code=self.status)


    async def pooling(self, request: Request) -> JSONResponse:
        """vLLM's token_embed task: one row of states per prompt token, flattened."""
        body = orjson.loads(await request.body())
        self.received.append(body)
        states = np.arange(len(body["input"][0]) * self.dim, dtype="<f4")
        return JSONResponse({"data": [{"data": base64.b64encode(states.tobytes()).decode()}]},
                            status_code=self.status)


def remote_cfg(tiny_scorer_cfg: ScorerConfig, url: str, **update: object) -> ScorerConfig:
    return ScorerConfig.model_validate(tiny_scorer_cfg.model_dump() | {
        "kind": "vllm", "url": url, "failure_threshold": 2, "cooldown_s": 60, **update})


async def score_once(fake: FakePooling, cfg: ScorerConfig, **update: object) -> tuple[VllmScorer, Scored]:
    """One request through a started scorer against ``fake``."""
    with serve(fake.app) as url:
        scorer = VllmScorer(remote_cfg(cfg, f"{url}/v1", **update))
        await scorer.start()
        try:
            return scorer, await scorer.score(MESSAGES, timeout_s=5)
        finally:
            await scorer.aclose()


async def test_sends_the_shared_token_ids_and_reads_the_pooled_vector(tiny_scorer_cfg: ScorerConfig) -> None:
    fake = FakePooling(dim=32)
    scorer, scored = await score_once(fake, tiny_scorer_cfg)
    sent = fake.received[0]
    assert sent["model"] == "scorer" and sent["encoding_format"] == "base64"
    assert sent["input"] == [scorer.encoder.encode(MESSAGES)]  # rendered and tokenised here, as the local scorer
    assert scored.prompt_tokens == len(sent["input"][0])
    np.testing.assert_array_equal(scored.features, np.arange(32, dtype=np.float32))


async def test_last_plus_mean_asks_for_every_token_and_pools_them_here(tiny_scorer_cfg: ScorerConfig) -> None:
    fake = FakePooling(dim=32)
    scorer, scored = await score_once(fake, tiny_scorer_cfg, pooling="last+mean")
    assert scorer.info.feature_dim == 64
    sent = fake.received[0]
    assert sent["task"] == "token_embed" and sent["input"] == [scorer.encoder.encode(MESSAGES)]
    states = np.arange(scored.prompt_tokens * 32, dtype=np.float32).reshape(scored.prompt_tokens, 32)
    np.testing.assert_allclose(scored.features, np.concatenate([states[-1], states.mean(axis=0)]))


async def test_a_key_waits_for_its_own_tokens_in_flight_not_for_another_keys(tiny_scorer_cfg: ScorerConfig) -> None:
    fake = FakePooling(dim=32)
    fake.gate.clear()
    with serve(fake.app) as url:
        scorer = VllmScorer(remote_cfg(tiny_scorer_cfg, f"{url}/v1", max_key_tokens_in_flight=1))
        await scorer.start()
        try:
            flood = [asyncio.create_task(scorer.score(MESSAGES, timeout_s=10, key="a")) for _ in range(3)]
            other = asyncio.create_task(scorer.score(MESSAGES, timeout_s=10, key="b"))
            for _ in range(200):  # a's first and b's reach the server; a's others wait at the gateway
                if len(fake.received) == 2:
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)
            assert len(fake.received) == 2
            with pytest.raises(ScorerUnavailable) as e:  # a's turn does not come within its timeout
                await scorer.score(MESSAGES, timeout_s=0.05, key="a")
            assert e.value.kind == "key_share" and scorer.alive  # the server is not to blame
            fake.gate.set()
            results = await asyncio.wait_for(asyncio.gather(*flood, other), 10)
            assert len(fake.received) == 4 and all(r.features is not None for r in results)  # the refused never went
            assert scorer.early_exit_info(1) is None  # the server's pass runs to the configured block
            scored = await scorer.score(MESSAGES, timeout_s=5, early=EarlyExit(1, lambda f: True))
            assert not scored.stopped and scored.early is None and scored.features is not None
        finally:
            fake.gate.set()
            await scorer.aclose()


async def test_a_vector_of_the_wrong_size_or_an_error_is_refused_and_counted(tiny_scorer_cfg: ScorerConfig) -> None:
    fake = FakePooling(dim=7)
    with serve(fake.app) as url:
        scorer = VllmScorer(remote_cfg(tiny_scorer_cfg, f"{url}/v1"))
        await scorer.start()
        try:
            with pytest.raises(ScorerUnavailable, match="returned 7 values, the recipe needs 32") as e:
                await scorer.score(MESSAGES, timeout_s=5)
            assert e.value.kind == "failed"
            fake.status = 500
            with pytest.raises(ScorerUnavailable, match="HTTP 500"):
                await scorer.score(MESSAGES, timeout_s=5)
            assert not scorer.alive  # two failures open the circuit: refused at once from now on
            with pytest.raises(ScorerUnavailable) as e:
                await scorer.score(MESSAGES, timeout_s=5)
            assert e.value.kind == "down" and len(fake.received) == 2
            fake.dim, fake.status = 32, 200
            assert await scorer.check()  # the health check lets the circuit try again, and the trial succeeds
            assert (await scorer.score(MESSAGES, timeout_s=5)).features.shape == (32,)
        finally:
            await scorer.aclose()


async def test_an_unreachable_scorer_fails_at_once(tiny_scorer_cfg: ScorerConfig) -> None:
    scorer = VllmScorer(remote_cfg(tiny_scorer_cfg, f"http://127.0.0.1:{free_port()}/v1"))
    await scorer.start()
    try:
        with pytest.raises(ScorerUnavailable) as e:
            await scorer.score(MESSAGES, timeout_s=30)
        assert e.value.kind == "failed"
        assert not await scorer.check()
    finally:
        await scorer.aclose()


def test_remote_kind_needs_one_layer_and_a_url(tiny_scorer_cfg: ScorerConfig) -> None:
    with pytest.raises(ValueError, match="needs url"):
        ScorerConfig(kind="vllm")
    with pytest.raises(ValueError, match="one layer"):
        tiny_scorer_cfg.model_validate(tiny_scorer_cfg.model_dump() | {"kind": "vllm", "url": "http://x/v1",
                                                                       "layers": [1, 2]})


def test_a_gateway_with_a_remote_scorer_loads_no_torch(tiny_scorer_cfg: ScorerConfig, tmp_path: Path) -> None:
    cfg = remote_cfg(tiny_scorer_cfg, f"http://127.0.0.1:{free_port()}/v1")
    probes = write_constant_probes(tmp_path, VllmScorer(cfg).info, {"small": 0.7, "large": 0.9})
    backends = [{"name": n, "base_url": "http://127.0.0.1:9/v1", "model": n, "input_cost_per_mtok": c,
                 "output_cost_per_mtok": c, "probe": str(probes[n])} for n, c in (("small", 1), ("large", 9))]
    config = {"scorer": {**cfg.model_dump(mode="json"), "cache_dir": str(cfg.cache_dir)}, "backends": backends}
    path = tmp_path / "remote.yaml"
    path.write_text(yaml.safe_dump(config))
    code = ("import sys; from router.cli import main; rc = main(['check', '--config', sys.argv[1]]); "
            "print('torch loaded:', 'torch' in sys.modules); sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code, str(path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "probes for small, large match it" in out.stdout
    assert "torch loaded: False" in out.stdout
