"""`make demo` stopped as a newcomer, a supervisor or CI would stop it: nothing it started survives.

Each case starts the real demo (`make demo`: two vLLM CPU servers and the gateway, on free ports), waits until
it serves, stops it, then checks that every process it started is gone and every port it used is free.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT
from tests.support.servers import free_port

pytestmark = pytest.mark.integration


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (from /proc's parent links)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def demo_pid(make_pid: int) -> int:
    for pid in descendants(make_pid):
        try:
            if b"scripts.demo" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
        except OSError:
            continue
    raise AssertionError("no scripts.demo process under make")


@pytest.mark.parametrize("how", ["SIGTERM to the group", "SIGINT to the group", "SIGKILL to the demo alone"])
def test_the_demo_leaves_nothing_behind(how: str, tmp_path: Path) -> None:
    ports = {"small": free_port(), "large": free_port(), "gateway": free_port()}
    env = dict(os.environ,
               QWEN_SMALL_URL=f"http://127.0.0.1:{ports['small']}/v1",
               QWEN_LARGE_URL=f"http://127.0.0.1:{ports['large']}/v1",
               ROUTER_SERVER__PORT=str(ports["gateway"]))
    log = (tmp_path / "demo.log").open("wb")
    make = subprocess.Popen(["make", "-s", "demo"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    started: set[int] = set()
    try:
        deadline = time.monotonic() + 600
        while True:
            assert make.poll() is None, (tmp_path / "demo.log").read_text(errors="replace")[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{ports['gateway']}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the demo did not become ready in 600 s"
            time.sleep(2)
        started = descendants(make.pid)
        assert len(started) >= 4  # the demo, the gateway and the two vLLM servers at least
        if how == "SIGKILL to the demo alone":
            os.kill(demo_pid(make.pid), signal.SIGKILL)
        else:
            os.killpg(make.pid, signal.SIGTERM if how.startswith("SIGTERM") else signal.SIGINT)
        make.wait(120)
        deadline = time.monotonic() + 120
        while (left := {p for p in started if alive(p)}) and time.monotonic() < deadline:
            time.sleep(1)
        assert not left, f"still running after {how}: {sorted(left)}"
        assert not any(port_in_use(p) for p in ports.values()), ports
    finally:
        for pid in started | {make.pid}:  # whatever a failed run left, by pid
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        log.close()
