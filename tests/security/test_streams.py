"""Finding 2 of issue 16: streams a client never reads cannot hold a backend hostage. A slow reader is cut off
(send timeout, or the request's deadline) without feeding the backend's breaker; one key cannot take more than
its share of a backend's connections; health checks have their own pool."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from router.config import ScorerConfig
from router.scorer.features import FeatureExtractor
from tests.security.attack import connection, wait_for
from tests.support.servers import FakeBackend, serve
from tests.support.stack import make_settings, metric, running_gateway

STREAM = {"model": "small", "messages": [{"role": "user", "content": "Tell me everything."}], "stream": True}


@pytest.fixture
def backends() -> Iterator[tuple[FakeBackend, str, str]]:
    small, large = FakeBackend("org/small"), FakeBackend("org/large")
    small.text = " ".join(["w" * 4000] * 3000)  # a 12 MB answer in 4 KB chunks: more than any socket buffers
    small.chunk_delay_s = 0.001
    with serve(small.app) as small_url, serve(large.app) as large_url:
        yield small, small_url, large_url


def _hold_unread_stream(url: str, headers: bytes = b"") -> contextlib.AbstractContextManager:  # type: ignore[type-arg]
    """Open a stream on a socket with a tiny receive buffer, read its first bytes, then read nothing more."""
    body = orjson.dumps(STREAM)

    @contextlib.contextmanager
    def held():  # type: ignore[no-untyped-def]
        with connection(url, timeout_s=10, rcvbuf=4096) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
                         + headers + b"content-length: %d\r\n\r\n" % len(body) + body)
            assert sock.recv(1024).startswith(b"HTTP/1.1 200")
            yield sock

    return held()


def _backend_not_blamed(url: str) -> None:
    assert metric(url, 'router_backend_up{backend="small"}') == 1
    assert metric(url, 'router_upstream_errors_total{backend="small"') == 0
    ready = httpx.get(f"{url}/ready").json()
    assert ready["backends"]["small"] == {"healthy": True, "circuit": "closed"}


@pytest.mark.parametrize("limit", ["send_timeout", "deadline"])
def test_a_client_that_stops_reading_is_cut_off_and_the_backend_is_not_blamed(
        backends, limit: str, tmp_path: Path, tiny_scorer_cfg: ScorerConfig, tiny_extractor: FeatureExtractor) -> None:
    small, small_url, large_url = backends
    sections = ({"server": {"send_timeout_s": 1}} if limit == "send_timeout"
                else {"small": {"total_timeout_s": 2}, "server": {"send_timeout_s": 600}})
    settings = make_settings(tmp_path, tiny_scorer_cfg, tiny_extractor.info, small_url, large_url,
                             resilience={"failure_threshold": 1}, **sections)
    with running_gateway(settings) as url:
        with _hold_unread_stream(url):
            # the gateway gives up on the client and closes the upstream request: the backend stops generating
            assert wait_for(lambda: small.cancelled >= 1, timeout_s=20)
        assert wait_for(lambda: metric(url, "router_requests_in_flight") == 0, timeout_s=5)
        _backend_not_blamed(url)  # with failure_threshold 1, a single failure would have opened its circuit
        r = httpx.post(f"{url}/v1/chat/completions", json={**STREAM, "stream": False}, timeout=30)
        assert r.status_code == 200


async def test_one_key_cannot_hold_every_connection_and_health_checks_keep_their_own(
        backends, tmp_path: Path, tiny_scorer_cfg: ScorerConfig, tiny_extractor: FeatureExtractor) -> None:
    small, small_url, large_url = backends
    small.chunk_delay_s = 0.5  # streams that last
    pool = {"max_connections": 3}
    settings = make_settings(
        tmp_path, tiny_scorer_cfg, tiny_extractor.info, small_url, large_url, small=pool, large=pool,
        auth={"keys": [{"name": "greedy", "key": "sk-greedy", "may_name_backend": True, "max_concurrent_requests": 2},
                       {"name": "other", "key": "sk-other", "may_name_backend": True, "max_concurrent_requests": 2}]},
    )
    greedy, other = {"authorization": "Bearer sk-greedy"}, {"authorization": "Bearer sk-other"}
    with running_gateway(settings) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client, contextlib.AsyncExitStack() as held:
            for _ in range(2):  # the greedy key's share, never read
                r = await held.enter_async_context(client.stream("POST", "/v1/chat/completions", json=STREAM,
                                                                 headers=greedy))
                assert r.status_code == 200
            refused = await client.post("/v1/chat/completions", json=STREAM, headers=greedy)
            assert refused.status_code == 429
            assert refused.json()["error"]["code"] == "concurrency_limit_exceeded"
            # the other key is served meanwhile, from the connections the greedy one could not take
            answer = await client.post("/v1/chat/completions", json={**STREAM, "stream": False}, headers=other)
            assert answer.status_code == 200
            # the pool of 3 now full (2 held + 1 more held by the other key): health checks still pass
            r = await held.enter_async_context(client.stream("POST", "/v1/chat/completions", json=STREAM,
                                                             headers=other))
            assert r.status_code == 200
            ready = await client.get("/ready", headers=other)
            assert ready.status_code == 200 and ready.json()["backends"]["small"]["healthy"] is True
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            assert wait_for(lambda: metric(url, "router_requests_in_flight", headers=other) == 0, timeout_s=10)
            free = await client.post("/v1/chat/completions", json={**STREAM, "stream": False}, headers=greedy)
            assert free.status_code == 200  # its share is free again
