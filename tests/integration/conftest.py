"""Two real vLLM CPU servers (SmolLM2-135M-Instruct standing in for the default pool) and the gateway with
the real default scorer and the shipped probes in front of them."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from router.app import create_app
from router.config import Settings, load_settings
from router.edge import server_options
from router.routing import load_engine
from router.scorer.source import resolve_model
from scripts.vllm_cpu import VllmServer, start_vllm, wait_ready
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
                                        log_path=self.logs / f"{name}-restarted.log")
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
                log_path=logs / f"{backend.name}.log")
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
    with serve(create_app(vllm_pool.settings, load_engine(vllm_pool.settings)),
               **server_options(vllm_pool.settings.server)) as url:
        yield url
