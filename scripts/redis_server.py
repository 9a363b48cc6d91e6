"""A real redis-server (Debian package redis-server) on 127.0.0.1, for `make demo-fleet` and the tests: its own
process group, stopped by pid, and stopped by the kernel if the process that started it dies."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

from scripts.vllm_cpu import stop_with_parent


class RedisServer:
    """One redis-server without persistence; ``stop`` and ``start`` again keep its port (a restart)."""

    def __init__(self, folder: Path, port: int) -> None:
        self.folder = folder
        self.port = port
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 10) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is missing: run scripts/install_system_tools.sh (Debian redis-server)")
        self.folder.mkdir(parents=True, exist_ok=True)
        log = (self.folder / f"redis-{self.port}.log").open("ab")
        self.process = subprocess.Popen([binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
                                         "--appendonly", "no", "--dir", str(self.folder)],
                                        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                        preexec_fn=stop_with_parent)
        log.close()
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server on port {self.port} did not start") from None
                time.sleep(0.05)
            finally:
                client.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.process = None


@contextmanager
def redis_server(folder: Path, port: int) -> Iterator[RedisServer]:
    server = RedisServer(folder, port)
    server.start()
    try:
        yield server
    finally:
        server.stop()
