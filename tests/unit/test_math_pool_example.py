"""examples/math-pool.yaml: four backends, probes that read the scorer's activations and the prompt's text
features, loaded by the gateway and used for a routed request (the backends here are small fakes; the same
config against a real vLLM CPU stand-in is in research/probes/README.md)."""

from __future__ import annotations

import httpx
import pytest

from router.app import create_app
from router.config import load_settings
from router.routing import load_probe_groups
from tests.conftest import ROOT
from tests.support.servers import FakeBackend, serve

CONFIG = ROOT / "examples" / "math-pool.yaml"
MODEL = ROOT / ".cache" / "SmolLM2-135M-Instruct"

pytestmark = pytest.mark.skipif(not (MODEL / "model.safetensors").is_file(), reason="the scorer model is not cached")


def test_math_pool_routes_among_four_backends() -> None:
    settings = load_settings(CONFIG)
    missing = [str(b.probe) for b in settings.backends if b.probe is None or not b.probe.is_file()]
    assert not missing, f"train them: see examples/math-pool.yaml ({missing})"
    assert len(settings.backends) == 4
    groups = load_probe_groups(settings)  # refuses probes made for another scorer or other text features
    (group,) = groups  # one scorer for the pool
    assert group.probes.names == [b.name for b in settings.backends]
    assert group.probes.text is not None
    fake = FakeBackend("standin")
    with serve(fake.app) as upstream:
        backends = [b.model_copy(update={"base_url": f"{upstream}/v1"}) for b in settings.backends]
        scorer = settings.scorer.model_copy(update={"timeout_s": 120.0})  # a loaded CI machine: score, never skip
        settings = settings.model_copy(update={"backends": backends, "scorer": scorer})
        with serve(create_app(settings, groups)) as url:
            question = "Find the sum of all real $x$ with $x^2 - 5x + 6 = 0$. Let's think step by step and output " \
                       "the final answer within \\boxed{}."
            r = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                           json={"model": "router", "messages": [{"role": "user", "content": question}]})
    assert r.status_code == 200, r.text
    assert r.headers["x-router-backend"] in {b.name for b in backends}
    assert r.headers["x-router-reason"] == "utility"
    assert 0 < float(r.headers["x-router-p-success"]) < 1
    assert fake.received[-1]["model"] == settings.backend(r.headers["x-router-backend"]).model
