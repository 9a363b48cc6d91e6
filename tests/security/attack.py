"""Attack tools for tests/security: raw sockets against a gateway on 127.0.0.1, every one bounded in bytes and time."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit


def address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 80


@contextmanager
def connection(url: str, timeout_s: float = 10.0, rcvbuf: int | None = None) -> Iterator[socket.socket]:
    sock = socket.socket()
    if rcvbuf is not None:  # before connect, so the window the peer sees is small from the start
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(timeout_s)
    sock.connect(address(url))
    try:
        yield sock
    finally:
        sock.close()


def read_until_closed(sock: socket.socket, limit: int = 1 << 20) -> bytes:
    """Everything the server sends until it closes the connection (or ``limit`` bytes, or the socket's timeout)."""
    data = b""
    try:
        while len(data) < limit:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return data


def send_until_refused(sock: socket.socket, chunks: Iterator[bytes], budget: int) -> int:
    """Send chunks until the server stops taking them (it closed the connection) or ``budget`` bytes are sent;
    return the bytes sent."""
    sent = 0
    try:
        for chunk in chunks:
            if sent >= budget:
                break
            sock.sendall(chunk)
            sent += len(chunk)
    except (BrokenPipeError, ConnectionResetError, TimeoutError):
        pass
    return sent


def status_of(response: bytes) -> int | None:
    """The status code of a raw HTTP answer, None if there was none."""
    if not response.startswith(b"HTTP/1.1 "):
        return None
    return int(response[9:12])


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def wait_for(condition, timeout_s: float, interval_s: float = 0.05) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval_s)
    return bool(condition())
