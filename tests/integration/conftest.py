"""Two real vLLM CPU servers (SmolLM2-135M-Instruct standing in for the default pool) and the gateway with
the real default scorer and the shipped probes in front of them."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from router.app import create_app
from router.config import ScorerConfig, Settings, load_settings
from router.edge import server_options
from router.routing import load_probe_groups
from router.scorer.source import resolve_model, truncate_model
from router.scorer.vllm import vllm_pooling_args
from scripts.redis_server import RedisServer, redis_server
from scripts.vllm_cpu import VllmServer, standin_args, start_vllm, wait_ready
from tests.conftest import ROOT
from tests.support.servers import free_port, serve


@dataclass
class Pool:
    settings: Settings
    servers: dict[str, VllmServer]
    model_dir: Path
    logs: Path

    def restart(self, name: str) -> VllmServer:
        """Start backend ``name`` again on its port (after a test stopped it) and wait until it serves."""
        old = self.servers[name]
        old.stop()
        core = [b.name for b in self.settings.backends].index(name) % 2
        names = [f"standin-{name}", self.settings.backend(name).model]
        self.servers[name] = start_vllm(self.model_dir, old.port, names, core=core,
                                        log_path=self.logs / f"{name}-restarted.log", extra_args=standin_args())
        wait_ready([self.servers[name]], timeout_s=600)
        return self.servers[name]


@pytest.fixture(scope="session")
def vllm_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    settings = load_settings(ROOT / "config.yaml")
    model_dir = resolve_model(settings.scorer.model, settings.scorer.cache_dir).path
    logs = tmp_path_factory.mktemp("vllm-logs")
    servers: dict[str, VllmServer] = {}
    try:
        for core, backend in enumerate(settings.backends):
            servers[backend.name] = start_vllm(
                model_dir, free_port(), [f"standin-{backend.name}", backend.model], core=core % 2,
                log_path=logs / f"{backend.name}.log", extra_args=standin_args())
        wait_ready(list(servers.values()), timeout_s=600)
        backends = [b.model_copy(update={"base_url": servers[b.name].base_url}) for b in settings.backends]
        # A fallback makes "nothing clears the threshold" deterministic: the dearest backend.
        policy = settings.policy.model_copy(update={"fallback": backends[-1].name})
        yield Pool(settings.model_copy(update={"backends": backends, "policy": policy}), servers, model_dir, logs)
    finally:
        for server in servers.values():
            server.stop()


@pytest.fixture(scope="session")
def gateway_url(vllm_pool: Pool) -> Iterator[str]:
    with serve(create_app(vllm_pool.settings, load_probe_groups(vllm_pool.settings)),
               **server_options(vllm_pool.settings.server)) as url:
        yield url


@dataclass
class ScorerServer:
    """A vLLM CPU pooling server running the scorer model cut after ``cfg``'s layer, and that scorer config."""

    server: VllmServer
    cfg: ScorerConfig
    served: Path

    def restart(self) -> None:
        self.server.stop()
        self.server = start_scorer(self.served, self.cfg, self.server.port, self.server.log_path.parent, "restarted")
        wait_ready([self.server], timeout_s=600)


def start_scorer(served: Path, cfg: ScorerConfig, port: int, logs: Path, tag: str = "") -> VllmServer:
    return start_vllm(served, port, [], core=1, log_path=logs / f"scorer-l{cfg.layers[0]}{tag}.log",
                      extra_args=vllm_pooling_args(cfg))


def scorer_server(cfg: ScorerConfig, logs: Path) -> ScorerServer:
    """Start (not wait for) a pooling server for ``cfg`` (kind vllm) on a free port."""
    served = truncate_model(resolve_model(cfg.model, cfg.cache_dir), cfg.layers[0], cfg.cache_dir)
    port = free_port()
    cfg = ScorerConfig.model_validate(cfg.model_dump() | {"kind": "vllm", "url": f"http://127.0.0.1:{port}/v1"})
    return ScorerServer(start_scorer(served, cfg, port, logs), cfg, served)


@pytest.fixture(scope="session")
def vllm_scorer(vllm_pool: Pool, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScorerServer]:
    """The default scorer (the shipped probes' recipe) on a vLLM CPU pooling server, in float32 (see
    test_vllm_scorer: compared with the local scorer, bf16's rounding would hide the comparison)."""
    cfg = vllm_pool.settings.scorer.model_copy(update={"dtype": "float32"})
    scorer = scorer_server(cfg, tmp_path_factory.mktemp("scorer-logs"))
    try:
        wait_ready([scorer.server], timeout_s=600)
        yield scorer
    finally:
        scorer.server.stop()


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server of the test's own, on a free port."""
    with redis_server(tmp_path, free_port()) as server:
        yield server
