"""A bounded load in which every request is answered, and a graceful stop that lets requests in flight finish."""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from router.config import ScorerConfig
from router.scorer.features import FeatureExtractor
from router.scorer.recipe import ScorerInfo
from tests.support.probes import write_constant_probes
from tests.support.process import gateway_process
from tests.support.servers import FakeBackend, serve
from tests.support.stack import ESTIMATES

TOTAL, CONCURRENCY = 2000, 64
QUESTION = [{"role": "user", "content": "Janet's ducks lay 16 eggs per day. How many are left?"}]


async def _load(url: str) -> collections.Counter[str]:
    """TOTAL requests, CONCURRENCY at a time: routed, named, streamed and completions, in rotation."""
    bodies = [
        ("/v1/chat/completions", {"model": "router", "messages": QUESTION}),
        ("/v1/chat/completions", {"model": "small", "messages": QUESTION}),
        ("/v1/chat/completions", {"model": "router", "messages": QUESTION, "stream": True}),
        ("/v1/completions", {"model": "router", "prompt": "2 + 2 ="}),
    ]
    outcomes: collections.Counter[str] = collections.Counter()
    slots = asyncio.Semaphore(CONCURRENCY)
    limits = httpx.Limits(max_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        async def one(i: int) -> None:
            path, body = bodies[i % len(bodies)]
            async with slots:
                r = await client.post(path, json=body)
            ended = not body.get("stream") or r.text.rstrip().endswith("data: [DONE]")
            outcomes["ok" if r.status_code == 200 and ended else f"{r.status_code}"] += 1
        await asyncio.gather(*(one(i) for i in range(TOTAL)))
    return outcomes


def config_for(scorer: ScorerConfig, info: ScorerInfo, folder: Path, small_url: str, large_url: str,
               **extra: Any) -> dict[str, Any]:
    probes = write_constant_probes(folder, info, ESTIMATES)
    backends = [{"name": name, "base_url": f"{url}/v1", "model": f"org/{name}", "input_cost_per_mtok": cost,
                 "output_cost_per_mtok": 2 * cost, "probe": str(probes[name])}
                for name, url, cost in (("small", small_url, 1), ("large", large_url, 10))]
    return {"scorer": scorer.model_dump(mode="json"), "backends": backends, "policy": {"threshold": 0.8}, **extra}


def test_every_request_of_a_bounded_load_is_answered(tmp_path: Path, tiny_scorer_cfg: ScorerConfig,
                                                      tiny_extractor: FeatureExtractor) -> None:
    with serve(FakeBackend("org/small").app) as small_url, serve(FakeBackend("org/large").app) as large_url:
        config = config_for(tiny_scorer_cfg, tiny_extractor.info, tmp_path, small_url, large_url)
        with gateway_process(tmp_path, config) as (url, _):
            outcomes = asyncio.run(_load(url))
            metrics = httpx.get(f"{url}/metrics").text
    assert outcomes == {"ok": TOTAL}
    assert "router_requests_in_flight 0.0" in metrics


def test_sigterm_lets_requests_in_flight_finish_then_stops(tmp_path: Path, tiny_scorer_cfg: ScorerConfig,
                                                          tiny_extractor: FeatureExtractor) -> None:
    slow = FakeBackend("org/small", "finished after the stop signal")
    slow.delay_s = 2.0
    with serve(slow.app) as backend_url:
        config = config_for(tiny_scorer_cfg, tiny_extractor.info, tmp_path, backend_url, backend_url,
                            server={"shutdown_timeout_s": 20})
        with gateway_process(tmp_path, config) as (url, gateway):
            answers: list[httpx.Response] = []
            body = {"model": "small", "messages": QUESTION}
            worker = threading.Thread(target=lambda: answers.append(
                httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)))
            worker.start()
            while not slow.received:  # the request has reached the backend
                time.sleep(0.02)
            os.kill(gateway.pid, signal.SIGTERM)
            worker.join(30)
            assert answers and answers[0].status_code == 200
            assert answers[0].json()["choices"][0]["message"]["content"] == "finished after the stop signal"
            assert gateway.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it is done
