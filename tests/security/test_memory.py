"""Findings 1 and 4 of issue 16 against the gateway as users run it (`python -m router serve`, its own process):
its resident memory stays within 200 MB of its baseline under the header attack and the big-prompt attack, and
another key is served throughout. Bounded: a few seconds of attack, tens of MB sent."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

from router.config import ScorerConfig
from router.scorer.features import FeatureExtractor
from tests.security.attack import connection, read_until_closed, rss_bytes, send_until_refused
from tests.support.probes import write_constant_probes
from tests.support.process import gateway_process
from tests.support.servers import FakeBackend, serve
from tests.support.stack import ESTIMATES

HEADROOM = 200 * 1024 * 1024
ATTACKER = {"authorization": "Bearer sk-attacker"}
OTHER = {"authorization": "Bearer sk-other"}
QUESTION = [{"role": "user", "content": "Janet's ducks lay 16 eggs per day. How many are left?"}]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, tiny_scorer_cfg: ScorerConfig,
            tiny_extractor: FeatureExtractor) -> Iterator[tuple[str, int]]:
    folder = tmp_path_factory.mktemp("memory")
    probes = write_constant_probes(folder, tiny_extractor.info, ESTIMATES)
    with serve(FakeBackend("org/small").app) as small_url, serve(FakeBackend("org/large").app) as large_url:
        backends = [{"name": name, "base_url": f"{url}/v1", "model": f"org/{name}", "input_cost_per_mtok": cost,
                     "output_cost_per_mtok": 2 * cost, "probe": str(probes[name])}
                    for name, url, cost in (("small", small_url, 1), ("large", large_url, 10))]
        scorer = tiny_scorer_cfg.model_dump(mode="json") | {"max_prompt_tokens": 512, "timeout_s": 30}
        config: dict[str, Any] = {
            "scorer": scorer, "backends": backends, "policy": {"threshold": 0.8},
            "auth": {"keys": [{"name": "attacker", "key": "sk-attacker", "max_concurrent_requests": 16},
                              {"name": "other", "key": "sk-other"}],
                     "failed_auth_per_minute": 10_000},
        }
        with gateway_process(folder, config) as (url, process):
            for _ in range(20):  # warm up: the scorer, the pools, the allocator
                assert _served(url)
            yield url, process.pid


def _served(url: str) -> bool:
    """The other key gets a scored, routed answer."""
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": "router", "messages": QUESTION}, headers=OTHER,
                   timeout=60)
    return r.status_code == 200 and r.headers["x-router-reason"] != "unscored"


@contextmanager
def _peak_rss(pid: int) -> Iterator[Callable[[], int]]:
    peak = [rss_bytes(pid)]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            peak[0] = max(peak[0], rss_bytes(pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield lambda: peak[0]
    finally:
        done.set()
        sampler.join(5)


def _while_attacked(url: str, attack: Callable[[], None], attackers: int) -> list[bool]:
    """Run ``attackers`` copies of ``attack`` and, meanwhile, the other key's requests; return whether each of
    those was served."""
    served: list[bool] = []
    with ThreadPoolExecutor(attackers) as pool:
        running = [pool.submit(attack) for _ in range(attackers)]
        while not all(f.done() for f in running) or not served:
            served.append(_served(url))
        for f in running:
            f.result()
    return served


def test_the_header_attack_leaves_memory_flat_and_others_served(gateway: tuple[str, int]) -> None:
    url, pid = gateway
    baseline = rss_bytes(pid)

    def attack() -> None:
        for round_ in range(3):  # the three rounds; each connection offers 32 MB of tiny headers
            with connection(url) as sock:
                sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\n")
                sent = send_until_refused(sock, itertools.repeat(b"a: b\r\n" * 2730), budget=32 << 20)
                read_until_closed(sock)
            assert sent < 32 << 20, f"round {round_}: the gateway took all 32 MB of headers"
        with connection(url) as sock:  # and one header value that would be 128 MB
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nhost: gw\r\nx-big: ")
            assert send_until_refused(sock, itertools.repeat(b"v" * 65536), budget=128 << 20) < 128 << 20

    with _peak_rss(pid) as peak:
        served = _while_attacked(url, attack, attackers=4)
    assert all(served), served
    assert peak() - baseline < HEADROOM, f"RSS {baseline >> 20} MB → peak {peak() >> 20} MB"


def test_the_big_prompt_attack_leaves_memory_flat_and_others_scored(gateway: tuple[str, int]) -> None:
    url, pid = gateway
    baseline = rss_bytes(pid)
    prompt = "eggs " * 780_000 + "How many are left?"  # 3.9 MB, under the 4 MB body limit

    def attack() -> None:
        r = httpx.post(f"{url}/v1/chat/completions", headers=ATTACKER, timeout=120,
                       json={"model": "router", "messages": [{"role": "user", "content": prompt}]})
        assert r.status_code == 200 and r.headers["x-router-reason"] != "unscored"

    with _peak_rss(pid) as peak:
        served = _while_attacked(url, attack, attackers=8)
    assert all(served), served
    assert peak() - baseline < HEADROOM, f"RSS {baseline >> 20} MB → peak {peak() >> 20} MB"
