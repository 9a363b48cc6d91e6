"""The gateway as its own process (`python -m router serve`), as users run it; stopped by pid."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.conftest import ROOT
from tests.support.servers import free_port


@contextmanager
def gateway_process(
    folder: Path, config: dict[str, Any], timeout_s: float = 180
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    config = {**config, "server": {**config.get("server", {}), "port": port}}
    path = folder / "gateway-config.yaml"
    path.write_text(yaml.safe_dump(config))
    log = (folder / "gateway.log").open("wb")
    process = subprocess.Popen([sys.executable, "-m", "router", "--log-level", "warning", "serve", "--config",
                                str(path)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                if process.poll() is not None or time.monotonic() > deadline:
                    tail = (folder / "gateway.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"gateway did not start: {tail}") from None
                time.sleep(0.2)
        yield url, process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        log.close()
