"""The processes a benchmark starts on 127.0.0.1, and what they cost: CPU seconds and peak memory via psutil."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil


def rotating_rounds(module: str, common: Sequence[str], flag: str, variants: Sequence[str], rounds: int,
                    describe: Callable[[dict[str, Any]], str] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Each variant measured once a round, each in its own process (``python -m MODULE *common FLAG variant``,
    whose last stdout line is a JSON object), the order rotating from round to round; returns each variant's
    objects with ``round`` and ``exit_status`` added. A process that printed is kept whatever its exit status
    (a scorer pass still under way when it ends may abort it after it printed); one that printed nothing stops
    the run. Each result is also written to stderr as it comes (``describe`` heads the line), so that a stopped
    run keeps what it measured."""
    out: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for r in range(rounds):
        for variant in list(variants[r % len(variants):]) + list(variants[:r % len(variants)]):
            done = subprocess.run([sys.executable, "-m", module, *common, flag, variant], stdout=subprocess.PIPE,
                                  text=True)
            lines = done.stdout.strip().splitlines()
            if not lines:
                raise SystemExit(f"{variant}: the measuring process printed nothing (exit status {done.returncode})")
            out[variant].append({**json.loads(lines[-1]), "round": r, "exit_status": done.returncode})
            head = describe(out[variant][-1]) if describe else ""
            print(f"round {r} {variant}: {head}" + json.dumps(out[variant][-1]), file=sys.stderr, flush=True)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """One server process, started at once; ``wait_ready`` polls ``ready_url`` until it answers 200."""

    def __init__(self, name: str, argv: Sequence[str], ready_url: str, log_dir: Path,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.ready_url = ready_url
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(list(argv), stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log_path}")
            try:
                with urllib.request.urlopen(self.ready_url, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"{self.name} was not ready in {timeout_s:.0f}s; see {self.log_path}")

    def processes(self) -> list[psutil.Process]:
        root = psutil.Process(self.proc.pid)
        return [root, *root.children(recursive=True)]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


def _cpu(procs: Sequence[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def _main_thread_cpu(proc: psutil.Process) -> float:
    """CPU of the process's main thread: for a gateway, its event loop (the scorer runs in other threads)."""
    try:
        for t in proc.threads():
            if t.id == proc.pid:
                return t.user_time + t.system_time
    except psutil.NoSuchProcess:
        pass
    return 0.0


@dataclass
class Usage:
    cpu_s: float  # all processes of the service
    loop_cpu_s: float  # the root process's main thread
    peak_rss_mb: float


class Watch:
    """CPU used by a service between ``start`` and ``stop``, and its peak resident memory meanwhile."""

    def __init__(self, service: Service, interval_s: float = 0.05) -> None:
        self.procs = service.processes()
        self.interval_s = interval_s
        self._peak = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._done.is_set():
            rss = 0
            for p in self.procs:
                with contextlib.suppress(psutil.NoSuchProcess):
                    rss += p.memory_info().rss
            self._peak = max(self._peak, rss)
            self._done.wait(self.interval_s)

    def __enter__(self) -> Watch:
        self._cpu0, self._loop0 = _cpu(self.procs), _main_thread_cpu(self.procs[0])
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        self.usage = Usage(_cpu(self.procs) - self._cpu0, _main_thread_cpu(self.procs[0]) - self._loop0,
                           self._peak / 2**20)
