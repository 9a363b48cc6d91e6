"""docker-compose.yml: valid for docker-compose (offline), and wired the way the gateway and Prometheus expect."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from router.config import load_settings
from router.scorer.vllm import vllm_pooling_args
from tests.deploy.tools import COMPOSE_FILE, PROMETHEUS_CONFIG, ROOT, compose_config

VLLM = {"vllm-small": "Qwen/Qwen2.5-Math-1.5B-Instruct", "vllm-large": "Qwen/Qwen2.5-Math-7B-Instruct"}


@pytest.fixture(scope="module")
def resolved() -> dict[str, Any]:
    return compose_config()


def test_compose_config_validates_with_the_example_env(resolved: dict[str, Any]) -> None:
    assert set(resolved["services"]) == {"gateway", "balancer", "scorer", "scorer-prepare", "redis", *VLLM,
                                         "prometheus", "grafana"}


@pytest.mark.parametrize(("service", "model"), VLLM.items())
def test_each_pool_model_has_a_vllm_server_on_a_gpu(resolved: dict[str, Any], service: str, model: str) -> None:
    svc = resolved["services"][service]
    assert svc["image"].startswith("vllm/vllm-openai:")
    command = svc["command"]
    assert command[command.index("--model") + 1] == model
    assert command[command.index("--port") + 1] == "8000"
    # tool calling on, with the parser Qwen2.5's chat template writes for (a request with tools is no 400)
    assert "--enable-auto-tool-choice" in command and command[command.index("--tool-call-parser") + 1] == "hermes"
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert devices and devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
    assert "/health" in " ".join(svc["healthcheck"]["test"])
    assert any(v.endswith(":/root/.cache/huggingface:rw") and v.startswith("hf-cache:") for v in svc["volumes"])
    assert "HUGGING_FACE_HUB_TOKEN" in svc["environment"]


def test_the_gateway_waits_for_healthy_backends_and_reaches_them_by_service_name(resolved: dict[str, Any]) -> None:
    gateway = resolved["services"]["gateway"]
    assert gateway["depends_on"] == {name: {"condition": "service_healthy"} for name in (*VLLM, "scorer", "redis")}
    env = gateway["environment"]
    assert env["QWEN_SMALL_URL"] == "http://vllm-small:8000/v1"
    assert env["QWEN_LARGE_URL"] == "http://vllm-large:8000/v1"
    assert env["ROUTER_SERVER__HOST"] == "0.0.0.0"
    assert env["ROUTER_SCORER__KIND"] == "vllm" and env["ROUTER_SCORER__URL"] == "http://scorer:8000/v1"
    assert env["ROUTER_STATE__REDIS_URL"] == "redis://redis:6379/0"
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
    targets = {job["job_name"]: [t for sc in job.get("static_configs", []) for t in sc["targets"]]
               for job in scrape["scrape_configs"]}
    metrics_port = raw["services"]["gateway"]["environment"]["ROUTER_SERVER__METRICS_PORT"]
    gateways = next(job for job in scrape["scrape_configs"] if job["job_name"] == "probe-router")
    assert gateways["dns_sd_configs"] == [{"names": ["gateway"], "type": "A", "port": int(metrics_port),
                                           "refresh_interval": "15s"}]  # every replica
    assert targets["scorer"] == ["scorer:8000"]
    assert sorted(targets["vllm"]) == sorted(f"{name}:8000" for name in VLLM)
    assert all(host.split(":")[0] in raw["services"] for job in ("scorer", "vllm") for host in targets[job])


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


def test_replicas_without_a_gpu_behind_the_one_published_port(resolved: dict[str, Any]) -> None:
    gateway, balancer = resolved["services"]["gateway"], resolved["services"]["balancer"]
    assert gateway["deploy"]["replicas"] >= 2 and "resources" not in gateway["deploy"]
    assert "ports" not in gateway  # replicas are reached through the balancer only
    assert balancer["image"].startswith("nginx:")
    assert balancer["ports"] == ["0.0.0.0:8000:8000/tcp"]  # .env.example: GATEWAY_BIND, GATEWAY_PORT
    conf = (ROOT / "deploy" / "nginx" / "nginx.conf").read_text()
    assert "server gateway:8000 resolve" in conf and "include /etc/nginx/proxy.conf;" in conf


def test_the_scorer_serves_the_configured_recipe_on_a_gpu(resolved: dict[str, Any]) -> None:
    """The scorer service's vLLM arguments are those `python -m router prepare --vllm` prints for config.yaml."""
    scorer = resolved["services"]["scorer"]
    cfg = load_settings(ROOT / "config.yaml").scorer.model_copy(update={"kind": "vllm", "device": "cuda"})
    command = scorer["command"]
    expected = vllm_pooling_args(cfg)
    assert all(command[command.index(flag) + 1] == value for flag, value in zip(expected[::2], expected[1::2],
                                                                                strict=True))
    assert command[command.index("--model") + 1].endswith(f"-first-{cfg.layers[0]}-blocks")
    devices = scorer["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    prepare = resolved["services"]["scorer-prepare"]
    assert prepare["command"][-4:] == ["prepare", "--vllm", "--config", "/app/config.yaml"]
    assert scorer["depends_on"] == {"scorer-prepare": {"condition": "service_completed_successfully"}}
