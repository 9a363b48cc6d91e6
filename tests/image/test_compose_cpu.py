"""docker-compose.cpu.yml, brought up with a real docker-compose: the gateway container routes to the vLLM CPU
stand-ins on this host, the Prometheus container scrapes it (and them), and the dashboard's queries return data.

Prometheus is prom/prometheus where it can be pulled, else the image scripts/build_image.sh builds from Debian's
package. deploy/prometheus/prometheus.cpu.yml is used with its ports moved to the free ones this test takes, and
config.yaml with scorer.timeout_s raised as for the other image tests (tests/image/engine.py says why)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
import yaml

from tests.deploy.test_prometheus_dashboard import Prometheus, to_promql
from tests.image.engine import NAME_PREFIX, ROOT, SCORER_TIMEOUT_S, build_script, docker, inspect
from tests.integration.conftest import Pool
from tests.support.servers import free_port

COMPOSE_FILE = ROOT / "docker-compose.cpu.yml"
CPU_PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.cpu.yml"
QUESTION = [{"role": "user", "content": "What is 17 * 23?"}]
SCRAPE_WAIT_S = 45  # the shipped config scrapes every 15 s
# a panel of the dashboard (Traffic: requests by backend over the dashboard's range)
REQUESTS_BY_BACKEND = 'sum by (backend) (increase(router_requests_total{backend=~"$backend"}[$__range]))'


def compose_command() -> list[str]:
    if found := shutil.which("docker-compose"):
        return [found]
    plugin = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, check=False)
    if plugin.returncode == 0:
        return ["docker", "compose"]
    pytest.fail("neither docker-compose nor `docker compose` is installed: run `make system-tools`", pytrace=False)


@dataclass
class Stack:
    gateway_url: str
    prometheus: Prometheus
    containers: dict[str, str]  # compose service -> container name
    started: float  # time.monotonic() before `up`


def cpu_prometheus_config(metrics_port: int, prometheus_port: int, vllm_ports: dict[str, int]) -> dict[str, Any]:
    """The shipped CPU config with each target on the port this test gave it (vLLM's by the `backend` label)."""
    config = yaml.safe_load(CPU_PROMETHEUS_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"probe-router", "vllm", "prometheus"}, "a new scrape job: teach this test about it"
    assert jobs["probe-router"]["static_configs"] == [{"targets": ["127.0.0.1:9100"]}]
    jobs["probe-router"]["static_configs"] = [{"targets": [f"127.0.0.1:{metrics_port}"]}]
    for static in jobs["vllm"]["static_configs"]:
        static["targets"] = [f"127.0.0.1:{vllm_ports[static['labels']['backend']]}"]
    jobs["prometheus"]["static_configs"] = [{"targets": [f"127.0.0.1:{prometheus_port}"]}]
    return config


@pytest.fixture(scope="module")
def stack(image: str, backend_urls: dict[str, str], vllm_pool: Pool,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("compose-cpu")
    prometheus_image = build_script("prometheus").stdout.split()[-1]
    gateway_port, metrics_port, prometheus_port = free_port(), free_port(), free_port()
    config = folder / "prometheus.yml"
    config.write_text(yaml.safe_dump(cpu_prometheus_config(
        metrics_port, prometheus_port, {name: server.port for name, server in vllm_pool.servers.items()})))
    config.chmod(0o644)  # Prometheus runs as nobody
    gateway_config = folder / "config.yaml"  # the shipped one, with the scorer's deadline of the other image tests
    settings = yaml.safe_load((ROOT / "config.yaml").read_text())
    settings["scorer"]["timeout_s"] = SCORER_TIMEOUT_S
    gateway_config.write_text(yaml.safe_dump(settings, sort_keys=False))
    gateway_config.chmod(0o644)  # the gateway runs as uid 10001
    (folder / "empty.env").write_text("")  # a .env of the checkout must not change what is tested
    env = {"GATEWAY_IMAGE": image, "PROMETHEUS_IMAGE": prometheus_image, **backend_urls,
           "GATEWAY_BIND": "127.0.0.1", "GATEWAY_PORT": str(gateway_port), "METRICS_PORT": str(metrics_port),
           "MONITORING_BIND": "127.0.0.1", "PROMETHEUS_PORT": str(prometheus_port),
           "PROMETHEUS_CONFIG": str(config), "ROUTER_CONFIG": str(gateway_config)}
    project = f"{NAME_PREFIX}-cpu"
    compose = [*compose_command(), "--project-name", project, "--file", str(COMPOSE_FILE),
               "--env-file", str(folder / "empty.env")]

    def run(*args: str, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([*compose, *args], capture_output=True, text=True, timeout=timeout_s, cwd=ROOT,
                                env={**os.environ, **env}, check=False)
        assert result.returncode == 0, f"compose {' '.join(args)}:\n{result.stdout}{result.stderr}"
        return result

    try:
        started = time.monotonic()
        run("up", "--detach")
        containers = {service: run("ps", "--quiet", service).stdout.strip() for service in ("gateway", "prometheus")}
        yield Stack(f"http://127.0.0.1:{gateway_port}", Prometheus(f"http://127.0.0.1:{prometheus_port}"),
                    containers, started)
    finally:
        logs = subprocess.run([*compose, "logs", "--no-color", "--tail", "40"], capture_output=True, text=True,
                              timeout=60, cwd=ROOT, env={**os.environ, **env}, check=False)
        (folder / "compose.log").write_text(logs.stdout + logs.stderr)
        run("down", "--volumes", "--timeout", "20")


def wait_healthy(container: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while (health := inspect("container", container)["State"]["Health"])["Status"] != "healthy":
        assert health["Status"] == "starting" and time.monotonic() < deadline, (
            f"{container}: {health}\n{docker('logs', '--tail', '40', container, check=False).stderr}")
        time.sleep(1)


def test_the_stack_comes_up_healthy(stack: Stack, figures: dict[str, Any]) -> None:
    for container in stack.containers.values():
        wait_healthy(container, timeout_s=300)
    figures["compose_up_to_healthy_s"] = round(time.monotonic() - stack.started, 1)
    assert httpx.get(f"{stack.gateway_url}/ready", timeout=30).json()["ready"] is True
    gateway = inspect("container", stack.containers["gateway"])
    assert gateway["HostConfig"]["ReadonlyRootfs"] is True and gateway["Config"]["User"] == "10001:10001"


def test_prometheus_scrapes_the_gateway_container_and_the_dashboard_has_data(stack: Stack, vllm_pool: Pool) -> None:
    wait_healthy(stack.containers["gateway"], timeout_s=300)
    sdk = openai.OpenAI(base_url=f"{stack.gateway_url}/v1", api_key="unused", max_retries=0, timeout=120)
    cheap, dear = (b.name for b in vllm_pool.settings.backends)
    sent = {cheap: 0, dear: 0}
    # two rounds, each followed by a scrape of every target: increase() needs two samples of each counter
    for _ in range(2):
        for threshold in ("0", "1"):  # one answer from each backend per round
            raw = sdk.chat.completions.with_raw_response.create(
                model="router", messages=QUESTION, max_tokens=4, extra_headers={"x-router-threshold": threshold})
            sent[raw.headers["x-router-backend"]] += 1
        stack.prometheus.wait_for_scrape_after(time.time() + 0.5, timeout_s=SCRAPE_WAIT_S)
    assert sent == {cheap: 2, dear: 2}

    up = stack.prometheus.values("up", by="job")
    assert up == {"probe-router": 1.0, "vllm": 1.0, "prometheus": 1.0}, stack.prometheus.query("up")
    assert stack.prometheus.values('up{job="vllm"}', by="backend") == {cheap: 1.0, dear: 1.0}
    totals = stack.prometheus.values("sum by (backend) (router_requests_total)", by="backend")
    assert totals == {cheap: 2.0, dear: 2.0}
    panel = stack.prometheus.values(to_promql(REQUESTS_BY_BACKEND), by="backend")
    assert set(panel) == {cheap, dear} and all(value > 0 for value in panel.values()), panel
