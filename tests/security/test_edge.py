"""Finding 1 and 3 of issue 16 at the edge, against a real gateway on 127.0.0.1 (its own listener: the edge
protocol with the configured limits): oversized heads, idle and slow connections, too many connections. Each
attack is bounded in bytes and time; after each, a client with a key is still served."""

from __future__ import annotations

import itertools
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import pytest

from router.config import ScorerConfig
from router.scorer.features import FeatureExtractor
from tests.security.attack import connection, read_until_closed, send_until_refused, status_of
from tests.support.servers import FakeBackend, serve
from tests.support.stack import make_settings, running_gateway

KEY = {"authorization": "Bearer sk-good"}
CHAT = {"model": "small", "messages": [{"role": "user", "content": "What is 2 + 2?"}]}
HEAD_TIMEOUT_S, BODY_TIMEOUT_S, MAX_CONNECTIONS = 1.0, 1.0, 12


@dataclass
class Edge:
    url: str
    small: FakeBackend

    def served(self) -> bool:
        """A client with a key still gets its answer."""
        r = httpx.post(f"{self.url}/v1/chat/completions", json=CHAT, headers=KEY, timeout=10)
        return r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "small says 4"


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory, tiny_scorer_cfg: ScorerConfig,
         tiny_extractor: FeatureExtractor) -> Iterator[Edge]:
    small, large = FakeBackend("org/small", "small says 4"), FakeBackend("org/large", "large says 4")
    with serve(small.app) as small_url, serve(large.app) as large_url:
        settings = make_settings(
            tmp_path_factory.mktemp("edge"), tiny_scorer_cfg, tiny_extractor.info, small_url, large_url,
            auth={"api_keys": ["sk-good"], "failed_auth_per_minute": 1000},
            server={"header_timeout_s": HEAD_TIMEOUT_S, "body_timeout_s": BODY_TIMEOUT_S,
                    "max_connections": MAX_CONNECTIONS},
        )
        with running_gateway(settings) as url:
            yield Edge(url, small)


def _head(extra: bytes = b"", target: bytes = b"/v1/models") -> bytes:
    return b"GET " + target + b" HTTP/1.1\r\nhost: gw\r\n" + extra


def test_too_many_header_fields_get_431_before_the_key_check(edge: Edge) -> None:
    with connection(edge.url) as sock:
        sock.sendall(_head(b"".join(b"x-%d: 1\r\n" % i for i in range(150)) + b"\r\n"))
        answer = read_until_closed(sock)
    assert status_of(answer) == 431 and b"more than 100 header fields" in answer
    assert edge.served()


def test_one_huge_header_value_is_refused_as_it_arrives(edge: Edge) -> None:
    """The 128 MB value of the issue, cut short: the gateway closes the connection after its 64 KiB limit (plus at
    most one read), so the client cannot push more than a few hundred KiB of its 16 MiB budget."""
    with connection(edge.url) as sock:
        sock.sendall(_head(b"x-big: "))
        sent = send_until_refused(sock, itertools.repeat(b"a" * 16384), budget=16 << 20)
        answer = read_until_closed(sock)
    assert status_of(answer) in (431, None)  # None: the reset can reach the client before the 431 does
    assert sent < 16 << 20
    assert edge.served()


def test_millions_of_tiny_headers_are_refused_at_the_limit(edge: Edge) -> None:
    """Finding 1's 4M tiny headers (32 MB) per connection, four connections, each cut off at the limit."""
    tiny = b"a: b\r\n" * 2730  # 16 KiB of headers per chunk
    for _ in range(4):
        with connection(edge.url) as sock:
            sock.sendall(_head())
            sent = send_until_refused(sock, itertools.repeat(tiny), budget=32 << 20)
            read_until_closed(sock)
        assert sent < 32 << 20
    assert edge.served()


def test_a_long_request_line_gets_414(edge: Edge) -> None:
    with connection(edge.url) as sock:
        sock.sendall(_head(b"\r\n", target=b"/v1/models?" + b"q" * 20000))
        answer = read_until_closed(sock)
    assert status_of(answer) == 414
    assert edge.served()


def test_a_connection_that_sends_nothing_is_closed_after_the_head_timeout(edge: Edge) -> None:
    started = time.monotonic()
    with connection(edge.url) as sock:
        answer = read_until_closed(sock)
    assert status_of(answer) == 408 and time.monotonic() - started < HEAD_TIMEOUT_S + 5
    assert edge.served()


def test_a_head_sent_one_byte_at_a_time_is_cut_off(edge: Edge) -> None:
    head = _head(b"authorization: Bearer sk-good\r\n\r\n")
    with connection(edge.url) as sock:
        started = time.monotonic()
        sent = send_until_refused(sock, (head[i:i + 1] for i in range(len(head)) if not time.sleep(0.2)),
                                  budget=len(head))
        answer = read_until_closed(sock)
    assert sent < len(head)  # refused before it finished
    assert status_of(answer) == 408 and time.monotonic() - started < HEAD_TIMEOUT_S + 5


def test_a_body_sent_slowly_is_cut_off_and_never_forwarded(edge: Edge) -> None:
    received = len(edge.small.received)
    body = b'{"model": "small", "messages": [{"role": "user", "content": "' + b"x" * 100 + b'"}]}'
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer sk-good\r\n"
            b"content-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body))
    with connection(edge.url) as sock:
        sock.sendall(head)
        sent = send_until_refused(sock, (body[i:i + 1] for i in range(len(body)) if not time.sleep(0.1)),
                                  budget=len(body))
        answer = read_until_closed(sock)
    assert sent < len(body) and status_of(answer) == 408
    assert len(edge.small.received) == received
    assert edge.served()


def test_connections_beyond_the_cap_are_closed_at_once_and_idle_ones_time_out(edge: Edge) -> None:
    """Finding 3: idle sockets could hold every file descriptor. Now the cap bounds them (one more is closed at
    once, before it costs a request) and the head timeout frees them."""
    time.sleep(0.5)  # the connections of earlier tests are gone from the server's count
    held = []
    try:
        for _ in range(MAX_CONNECTIONS):
            sock = socket.create_connection(("127.0.0.1", int(edge.url.rsplit(":", 1)[1])), timeout=10)
            held.append(sock)
        time.sleep(0.2)  # the server has accepted them all
        with connection(edge.url) as extra:
            extra.sendall(_head(b"\r\n"))
            assert read_until_closed(extra) == b""  # closed without an answer
        for sock in held:  # each idle one is closed by the head timeout
            assert status_of(read_until_closed(sock)) == 408
    finally:
        for sock in held:
            sock.close()
    assert edge.served()


def test_health_answers_without_a_key_and_everything_else_needs_one(edge: Edge) -> None:
    assert httpx.get(f"{edge.url}/health").status_code == 200
    assert httpx.get(f"{edge.url}/v1/models").status_code == 401


def test_an_edge_refusal_is_an_openai_error(edge: Edge) -> None:
    with connection(edge.url) as sock:
        sock.sendall(_head(b"".join(b"x-%d: 1\r\n" % i for i in range(150)) + b"\r\n"))
        answer = read_until_closed(sock)
    body = answer.partition(b"\r\n\r\n")[2]
    assert body.startswith(b'{"error":{"message":"more than 100 header fields","type":"invalid_request_error"')


def test_uvicorns_keep_alive_still_closes_idle_connections(tmp_path: Path, tiny_scorer_cfg: ScorerConfig,
                                                           tiny_extractor: FeatureExtractor) -> None:
    with serve(FakeBackend("org/small").app) as small_url, serve(FakeBackend("org/large").app) as large_url:
        settings = make_settings(tmp_path, tiny_scorer_cfg, tiny_extractor.info, small_url, large_url,
                                 server={"keep_alive_s": 0.5})
        with running_gateway(settings) as url, connection(url) as sock:
            sock.sendall(_head(b"\r\n", target=b"/health"))
            answer = read_until_closed(sock)  # the answer, then the close after the keep-alive timeout
        assert status_of(answer) == 200 and answer.endswith(b'{"status":"ok"}')


def _chat_request(content: str, extra: bytes = b"") -> bytes:
    body = orjson.dumps({"model": "small", "messages": [{"role": "user", "content": content}]})
    return (b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer sk-good\r\n"
            b"content-type: application/json\r\ncontent-length: %d\r\n%s\r\n" % (len(body), extra)) + body


def test_pipelined_requests_and_100_continue_get_whole_answers(edge: Edge) -> None:
    """What the edge writes for each answer (head and body joined in one write) stays whole, one answer each."""
    with connection(edge.url) as sock:  # three requests in one packet, the last one closing the connection
        sock.sendall(_chat_request("one") + _chat_request("two") + _chat_request("three", b"connection: close\r\n"))
        answers = read_until_closed(sock)
    heads = answers.split(b"HTTP/1.1 ")[1:]
    assert [status_of(b"HTTP/1.1 " + h) for h in heads] == [200, 200, 200]
    assert answers.count(b"small says 4") == 3 and answers.endswith(b"}")
    with connection(edge.url) as sock:
        request = _chat_request("four", b"expect: 100-continue\r\nconnection: close\r\n")
        head, _, body = request.partition(b"\r\n\r\n")
        sock.sendall(head + b"\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(body)
        answer = read_until_closed(sock)
    assert status_of(answer) == 200 and b"small says 4" in answer
