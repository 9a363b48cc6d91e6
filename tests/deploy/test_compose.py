"""docker-compose.yml: valid for docker-compose (offline), and wired the way the gateway and Prometheus expect."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from router.config import load_settings
from tests.deploy.tools import COMPOSE_FILE, PROMETHEUS_CONFIG, ROOT, compose_config

VLLM = {"vllm-small": "Qwen/Qwen2.5-Math-1.5B-Instruct", "vllm-large": "Qwen/Qwen2.5-Math-7B-Instruct"}


@pytest.fixture(scope="module")
def resolved() -> dict[str, Any]:
    return compose_config()


def test_compose_config_validates_with_the_example_env(resolved: dict[str, Any]) -> None:
    assert set(resolved["services"]) == {"gateway", *VLLM, "prometheus", "grafana"}


@pytest.mark.parametrize(("service", "model"), VLLM.items())
def test_each_pool_model_has_a_vllm_server_on_a_gpu(resolved: dict[str, Any], service: str, model: str) -> None:
    svc = resolved["services"][service]
    assert svc["image"].startswith("vllm/vllm-openai:")
    command = svc["command"]
    assert command[command.index("--model") + 1] == model
    assert command[command.index("--port") + 1] == "8000"
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert devices and devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
    assert "/health" in " ".join(svc["healthcheck"]["test"])
    assert any(v.endswith(":/root/.cache/huggingface:rw") and v.startswith("hf-cache:") for v in svc["volumes"])
    assert "HUGGING_FACE_HUB_TOKEN" in svc["environment"]


def test_the_gateway_waits_for_healthy_backends_and_reaches_them_by_service_name(resolved: dict[str, Any]) -> None:
    gateway = resolved["services"]["gateway"]
    assert gateway["depends_on"] == {name: {"condition": "service_healthy"} for name in VLLM}
    env = gateway["environment"]
    assert env["QWEN_SMALL_URL"] == "http://vllm-small:8000/v1"
    assert env["QWEN_LARGE_URL"] == "http://vllm-large:8000/v1"
    assert env["ROUTER_SERVER__HOST"] == "0.0.0.0"
    assert "/health" in " ".join(gateway["healthcheck"]["test"])
    # config.yaml must read the variables the compose file sets
    config = (ROOT / "config.yaml").read_text()
    assert "${QWEN_SMALL_URL" in config and "${QWEN_LARGE_URL" in config


def test_mounted_host_paths_exist_and_are_read_only(resolved: dict[str, Any]) -> None:
    for name, svc in resolved["services"].items():
        for volume in svc.get("volumes", []):
            source, target, *mode = volume.split(":")
            if source.startswith("/"):  # a bind mount (named volumes have no slash)
                assert Path(source).exists(), f"{name}: {source} does not exist"
                assert mode == ["ro"], f"{name}: {source} -> {target} should be read-only"


def test_prometheus_scrapes_the_compose_services() -> None:
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    scrape = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    targets = {job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]]
               for job in scrape["scrape_configs"]}
    metrics_port = raw["services"]["gateway"]["environment"]["ROUTER_SERVER__METRICS_PORT"]
    assert targets["probe-router"] == [f"gateway:{metrics_port}"]
    assert sorted(targets["vllm"]) == sorted(f"{name}:8000" for name in VLLM)
    assert all(host.split(":")[0] in raw["services"] for job in ("probe-router", "vllm") for host in targets[job])


def test_the_gateway_environment_keeps_the_calibrated_threshold(resolved: dict[str, Any],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The container's variables (from .env.example) applied to config.yaml give the calibrated settings."""
    env = resolved["services"]["gateway"]["environment"]
    for name, value in env.items():
        monkeypatch.setenv(name, "" if value is None else str(value))
    calibrated = re.search(r"threshold: \$\{ROUTER_THRESHOLD:-([0-9.]+)\}", (ROOT / "config.yaml").read_text())
    assert calibrated is not None
    settings = load_settings(ROOT / "config.yaml")
    assert settings.policy.threshold == float(calibrated.group(1))
    assert str(settings.backends[0].base_url) == "http://vllm-small:8000/v1"
    monkeypatch.setenv("ROUTER_THRESHOLD", "0.9")  # a value in .env wins
    assert load_settings(ROOT / "config.yaml").policy.threshold == 0.9
