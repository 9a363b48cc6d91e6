"""The gateway image, built by scripts/build_image.sh and run on a real Docker engine (make test-image).

Every test here is skipped, with the reason, where no Docker engine answers. The measured figures (image size,
build time, start-up time to ready) are printed at the end of the run and written to runs/image/figures.json.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.image.engine import IMAGE, NO_ENGINE, ROOT, build_script, engine_answers, inspect
from tests.integration.conftest import Pool, vllm_pool  # noqa: F401  (the fixture: real vLLM CPU stand-ins)

FIGURES = pytest.StashKey[dict[str, Any]]()
FIGURES_FILE = ROOT / "runs" / "image" / "figures.json"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not engine_answers():
        skip = pytest.mark.skip(reason=NO_ENGINE)
        for item in items:
            if item.path.is_relative_to(ROOT / "tests" / "image"):
                item.add_marker(skip)


@pytest.fixture(scope="session")
def figures(request: pytest.FixtureRequest) -> dict[str, Any]:
    return request.config.stash.setdefault(FIGURES, {})


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    found = config.stash.get(FIGURES, None)
    if not found:
        return
    FIGURES_FILE.parent.mkdir(parents=True, exist_ok=True)
    FIGURES_FILE.write_text(json.dumps(found, indent=2) + "\n")
    terminalreporter.write_sep("-", f"image figures (also in {FIGURES_FILE.relative_to(ROOT)})")
    for key, value in found.items():
        terminalreporter.write_line(f"{key}: {value}")


@pytest.fixture(scope="session")
def image(figures: dict[str, Any]) -> str:
    """IMAGE built with `make image`'s script (BuildKit's cache makes a rebuild of unchanged sources quick)."""
    started = time.monotonic()
    build_script()
    figures["build_s"] = round(time.monotonic() - started, 1)
    size = inspect("image", IMAGE)["Size"]
    figures["image_size_bytes"] = size
    figures["image_size_gb"] = round(size / 1e9, 2)
    return IMAGE


@pytest.fixture(scope="session")
def backend_urls(vllm_pool: Pool) -> dict[str, str]:  # noqa: F811
    """config.yaml's backend variables, pointed at the vLLM CPU stand-ins on this host."""
    small, large = (vllm_pool.servers[b.name].base_url for b in vllm_pool.settings.backends)
    return {"QWEN_SMALL_URL": small, "QWEN_LARGE_URL": large}


@pytest.fixture(scope="session")
def gateway_names(vllm_pool: Pool) -> list[str]:  # noqa: F811
    return [b.name for b in vllm_pool.settings.backends]


@pytest.fixture
def cleanup() -> Iterator[list[Any]]:
    """Things with a remove() the test started; removed at its end, whatever happened."""
    started: list[Any] = []
    yield started
    for thing in reversed(started):
        thing.remove()
