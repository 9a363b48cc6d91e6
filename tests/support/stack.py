"""A gateway with the tiny test scorer and constant probes, in front of given backend URLs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai

from router.app import create_app
from router.config import ScorerConfig, Settings
from router.edge import server_options
from router.routing import load_probe_groups
from router.scorer.recipe import ScorerInfo
from tests.support.probes import write_constant_probes
from tests.support.servers import FakeBackend, serve

ESTIMATES = {"small": 0.70, "large": 0.95}


def make_settings(folder: Path, scorer: ScorerConfig, info: ScorerInfo, small_url: str, large_url: str,
                  **sections: dict[str, Any]) -> Settings:
    """Two backends: 'small' ($1/$2 per Mtok, p=0.70) and 'large' ($10/$20, p=0.95); threshold 0.8."""
    probes = write_constant_probes(folder, info, ESTIMATES)
    backend = {"connect_timeout_s": 1}
    return Settings(
        scorer=scorer,
        backends=[
            {"name": "small", "base_url": f"{small_url}/v1", "model": "org/small", "input_cost_per_mtok": 1,
             "output_cost_per_mtok": 2, "probe": probes["small"], **backend, **sections.pop("small", {})},
            {"name": "large", "base_url": f"{large_url}/v1", "model": "org/large", "input_cost_per_mtok": 10,
             "output_cost_per_mtok": 20, "probe": probes["large"], **backend, **sections.pop("large", {})},
        ],
        policy={"threshold": 0.8, **sections.pop("policy", {})},
        server={"max_body_bytes": 64 * 1024, **sections.pop("server", {})},
        **sections,
    )


@contextmanager
def running_gateway(settings: Settings) -> Iterator[str]:
    with serve(create_app(settings, load_probe_groups(settings)), **server_options(settings.server)) as url:
        yield url


def metric(url: str, name: str, headers: dict[str, str] | None = None) -> float:
    """The sum of every sample on ``url``/metrics whose line starts with ``name``."""
    text = httpx.get(f"{url}/metrics", headers=headers).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


@dataclass
class Stack:
    """A gateway (``make_settings``) in front of two fake backends, and an OpenAI client of it."""

    url: str
    small: FakeBackend
    large: FakeBackend
    client: openai.OpenAI

    def metric(self, name: str) -> float:
        return metric(self.url, name)


@contextmanager
def fake_stack(folder: Path, scorer: ScorerConfig, info: ScorerInfo) -> Iterator[Stack]:
    small, large = FakeBackend("org/small", "small says 4"), FakeBackend("org/large", "large says 4")
    with serve(small.app) as small_url, serve(large.app) as large_url:
        settings = make_settings(folder, scorer, info, small_url, large_url)
        with running_gateway(settings) as url:
            yield Stack(url, small, large, openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0))
