"""A real vLLM backend dies during a bounded load and comes back (runs after the other integration tests).

Every request is answered: non-streamed ones always completely (they fail over); streams completely unless
they were mid-answer on the server that died, which end with an explicit error event."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import time
import uuid

import httpx
import pytest

from router.app import create_app
from router.edge import server_options
from router.routing import load_probe_groups
from tests.integration.conftest import Pool, ScorerServer
from tests.support.servers import serve

pytestmark = pytest.mark.integration

REQUESTS = 48
CONCURRENCY = 4
KILL_AFTER = 8  # answered requests before the cheap backend is killed


async def _load(url: str, on_answer, threshold: str | None = "0") -> list[httpx.Response]:  # type: ignore[no-untyped-def]
    """REQUESTS routed chat requests, CONCURRENCY at a time; every one is awaited to its end. The default
    threshold header sends everything to the cheap backend."""
    body = {"model": "router", "max_tokens": 4, "messages": [{"role": "user", "content": "What is 6 * 7?"}]}
    slots = asyncio.Semaphore(CONCURRENCY)
    run = uuid.uuid4().hex[:8]
    # The kill below blocks this loop for up to 10 s. httpx's pool, given its default 5 s keep-alive expiry, may
    # then close an idle connection it has just handed to a request that has not run yet (ClosedResourceError
    # on the client: a client-side race, nothing reached the gateway). No expiry here; the gateway keeps
    # connections for 75 s (server.keep_alive_s), longer than this test.
    limits = httpx.Limits(keepalive_expiry=None)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        async def one(i: int) -> httpx.Response:
            # a prompt no other request (of this load or an earlier one) asked: the score cache would decide a
            # repeated one without the scorer
            asked = {**body, "messages": [{"role": "user", "content": f"[{run}] What is {i} * 7?"}]}
            async with slots:
                stream = i % 2 == 1
                headers = {"x-router-threshold": threshold} if threshold is not None else {}
                r = await client.post(f"{url}/v1/chat/completions", json={**asked, "stream": stream}, headers=headers)
                on_answer(r)
                return r
        return await asyncio.gather(*(one(i) for i in range(REQUESTS)))


def test_killing_a_backend_under_load_loses_no_request_and_it_rejoins(vllm_pool: Pool) -> None:
    cheap, dear = (b.name for b in vllm_pool.settings.backends)
    settings = vllm_pool.settings.model_copy(update={"resilience": vllm_pool.settings.resilience.model_copy(
        update={"failure_threshold": 1, "cooldown_s": 3.0, "health_interval_s": 0.5, "deadline_s": 60})})
    answered: list[httpx.Response] = []

    def on_answer(r: httpx.Response) -> None:
        answered.append(r)
        if len(answered) == KILL_AFTER:
            vllm_pool.servers[cheap].stop(timeout_s=5)  # SIGTERM to its process group, mid-load

    with serve(create_app(settings, load_probe_groups(settings)), **server_options(settings.server)) as url:
        responses = asyncio.run(_load(url, on_answer))
        assert [r.status_code for r in responses] == [200] * REQUESTS
        interrupted = 0
        for r in responses:
            if r.headers.get("content-type", "").startswith("text/event-stream"):
                # A stream that was mid-answer when its server died cannot move (its bytes are out): it ends
                # with an explicit error event, never a hang. Every other stream is complete.
                if b'"code":"stream_interrupted"' in r.content:
                    interrupted += 1
                else:
                    assert r.content.rstrip().endswith(b"data: [DONE]")
            else:  # non-streamed answers fail over transparently, even when cut off mid-way
                assert r.json()["choices"][0]["message"]["content"] is not None
        assert interrupted <= CONCURRENCY  # at most the streams in flight at the moment of the kill
        reasons = [r.headers["x-router-reason"] for r in responses]
        print(f"\nkill under load: {REQUESTS} requests, {reasons.count('failover')} failed over, "
              f"{interrupted} streams interrupted mid-answer, 0 unanswered")
        served = [r.headers["x-router-backend"] for r in responses]
        assert served.count(dear) >= REQUESTS - KILL_AFTER - CONCURRENCY  # the survivor took over
        metrics = httpx.get(f"{url}/metrics").text
        assert f'router_backend_up{{backend="{cheap}"}} 0.0' in metrics

        vllm_pool.restart(cheap)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            r = httpx.post(f"{url}/v1/chat/completions", headers={"x-router-threshold": "0"}, timeout=60,
                           json={"model": "router", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]})
            assert r.status_code == 200
            if r.headers["x-router-backend"] == cheap:
                break
            time.sleep(0.5)
        assert r.headers["x-router-backend"] == cheap, "the restarted backend did not rejoin within 60 s"
        assert f'router_backend_up{{backend="{cheap}"}} 1.0' in httpx.get(f"{url}/metrics").text


def test_killing_the_vllm_scorer_under_load_routes_unscored_at_once_and_it_rejoins(
    vllm_pool: Pool, vllm_scorer: ScorerServer,
) -> None:
    settings = vllm_pool.settings.model_copy(update={"scorer": vllm_scorer.cfg})
    answered: list[httpx.Response] = []

    def on_answer(r: httpx.Response) -> None:
        answered.append(r)
        if len(answered) == KILL_AFTER:
            os.killpg(vllm_scorer.server.process.pid, signal.SIGKILL)  # the scorer and its engine, outright
            vllm_scorer.server.process.wait(10)

    with serve(create_app(settings, load_probe_groups(settings)), **server_options(settings.server)) as url:
        responses = asyncio.run(_load(url, on_answer, threshold=None))
        assert [r.status_code for r in responses] == [200] * REQUESTS  # none lost
        reasons = [r.headers["x-router-reason"] for r in responses]
        unscored = [r for r in responses if r.headers["x-router-reason"] == "unscored"]
        assert len(unscored) >= REQUESTS - KILL_AFTER - CONCURRENCY
        assert all(r.headers["x-router-backend"] == settings.policy.fallback for r in unscored)
        assert all("x-router-scorer-ms" not in r.headers for r in unscored)
        # unscored at once: refused connections, then the open circuit; no request waited out the timeout
        metrics = httpx.get(f"{url}/metrics").text
        assert 'router_scorer_errors_total{kind="timeout"}' not in metrics
        assert 'router_scorer_errors_total{kind="down"}' in metrics
        print(f"\nscorer killed under load: {REQUESTS} requests, {reasons.count('unscored')} unscored, 0 unanswered")
        ready = httpx.get(f"{url}/ready", timeout=10)
        assert ready.status_code == 503 and ready.json()["scorer"] == "down"
        assert "router_scorer_up 0.0" in httpx.get(f"{url}/metrics").text

        vllm_scorer.restart()
        deadline = time.monotonic() + 60
        for n in itertools.count():  # distinct prompts, so the score cache cannot answer for the scorer
            if time.monotonic() >= deadline:
                break
            r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
                "model": "router", "max_tokens": 2, "messages": [{"role": "user", "content": f"Hi, is {n} even?"}]})
            assert r.status_code == 200
            if r.headers["x-router-reason"] != "unscored":
                break
            time.sleep(0.5)
        assert r.headers["x-router-reason"] != "unscored", "scoring did not resume within 60 s of the restart"
        assert httpx.get(f"{url}/ready", timeout=10).json()["scorer"] == "up"
        assert "router_scorer_up 1.0" in httpx.get(f"{url}/metrics").text
