"""The Docker engine as the image tests use it: the docker CLI, the build script, and gateway containers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = ROOT / "scripts" / "build_image.sh"
IMAGE = os.environ.get("IMAGE", "probe-router:local")  # the tag `make image` builds; the build script reads it too
NO_ENGINE = ("no Docker engine answers here: install one and start it "
             "(docs/guides/deploy.md: apt-get install docker.io mmdebstrap; dockerd)")
NAME_PREFIX = f"probe-router-test-{os.getpid()}"  # every container these tests start, removed by name
# scorer.timeout_s for the gateways under test. On a busy shared test machine one forward pass can take longer
# than the default 10 s, and the request is then routed unscored to the fallback: right, but not what these tests
# look at (they check routes that depend on the scores).
SCORER_TIMEOUT_S = 120


def docker_cli() -> str | None:
    return shutil.which("docker")


def docker(*args: str, timeout_s: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    cli = docker_cli()
    assert cli is not None, NO_ENGINE
    result = subprocess.run([cli, *args], capture_output=True, text=True, timeout=timeout_s, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} exited {result.returncode}:\n{result.stdout}{result.stderr}")
    return result


def engine_answers() -> bool:
    if docker_cli() is None:
        return False
    try:
        return docker("info", "--format", "{{.ServerVersion}}", timeout_s=20, check=False).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def build_script(*args: str, timeout_s: float = 1800) -> subprocess.CompletedProcess[str]:
    """scripts/build_image.sh, as `make image` runs it; fails with the end of its output."""
    result = subprocess.run(["bash", str(BUILD_SCRIPT), *args], capture_output=True, text=True, cwd=ROOT,
                            timeout=timeout_s, check=False)
    if result.returncode != 0:
        raise AssertionError(f"scripts/build_image.sh {' '.join(args)} exited {result.returncode}:\n"
                             f"{(result.stdout + result.stderr)[-6000:]}")
    return result


def inspect(kind: str, name: str) -> dict[str, Any]:
    return json.loads(docker(kind, "inspect", name).stdout)[0]


@dataclass
class Gateway:
    """A gateway container on the host's network: its API on ``port``, /metrics on ``metrics_port``."""

    name: str
    port: int
    metrics_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def exec(self, *cmd: str) -> subprocess.CompletedProcess[str]:
        return docker("exec", self.name, *cmd, check=False)

    def logs(self) -> str:
        result = docker("logs", "--tail", "80", self.name, check=False)
        return result.stdout + result.stderr

    def running(self) -> bool:
        return bool(inspect("container", self.name)["State"]["Running"])

    def wait_ready(self, timeout_s: float = 600) -> None:
        """Until /ready answers 200; fail with the container's log if it exits or the time runs out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.running():
                raise AssertionError(f"{self.name} exited before it was ready:\n{self.logs()}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        raise AssertionError(f"{self.name}: /ready not 200 after {timeout_s:.0f}s:\n{self.logs()}")

    def remove(self) -> None:
        docker("rm", "--force", self.name, check=False)


def run_gateway(suffix: str, port: int, metrics_port: int, backend_urls: dict[str, str]) -> Gateway:
    """Start IMAGE as a deployment would: read-only root filesystem, /tmp a tmpfs, the image's own user;
    the host's network, so that it reaches the vLLM servers on 127.0.0.1 (``backend_urls``: the variables
    config.yaml reads, QWEN_SMALL_URL and QWEN_LARGE_URL)."""
    gateway = Gateway(f"{NAME_PREFIX}-{suffix}", port, metrics_port)
    env = [f"--env={key}={value}" for key, value in backend_urls.items()]
    docker("run", "--detach", "--name", gateway.name, "--network", "host", "--read-only", "--tmpfs", "/tmp",
           *env, "--env=ROUTER_SERVER__HOST=127.0.0.1", f"--env=ROUTER_SERVER__PORT={port}",
           f"--env=ROUTER_SCORER__TIMEOUT_S={SCORER_TIMEOUT_S}",
           f"--env=ROUTER_SERVER__METRICS_PORT={metrics_port}", IMAGE)
    return gateway
