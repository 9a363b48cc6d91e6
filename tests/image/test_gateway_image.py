"""The gateway image, run as deployed (read-only root filesystem, its own non-root user, host network) in
front of real vLLM CPU servers on this host: ready, routed answers for the openai SDK, /metrics on the internal
port, a graceful stop; and what the image must not hold (a compiler, the build host's CA bundle)."""

from __future__ import annotations

import concurrent.futures
import re
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.image.engine import Gateway, docker, inspect, run_gateway
from tests.support.servers import free_port

QUESTION = [{"role": "user", "content": "Natalia sold clips to 48 of her friends in April, and then she sold half "
             "as many clips in May. How many clips did Natalia sell altogether in April and May?"}]
USER = "10001:10001"  # the Dockerfile's USER
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")  # scripts/build_image.sh's default BUILD_CA
LOCAL_CAS = Path("/usr/local/share/ca-certificates")  # what update-ca-certificates adds to it on Debian


def client(gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def gateway(image: str, backend_urls: dict[str, str], figures: dict[str, Any]) -> Iterator[Gateway]:
    started = time.monotonic()
    gateway = run_gateway("main", free_port(), free_port(), backend_urls)
    try:
        gateway.wait_ready()
        figures["start_to_ready_s"] = round(time.monotonic() - started, 1)
        yield gateway
    finally:
        gateway.remove()


def test_runs_as_its_own_user_on_a_read_only_root_filesystem(image: str, gateway: Gateway) -> None:
    assert inspect("image", image)["Config"]["User"] == USER
    assert inspect("container", gateway.name)["HostConfig"]["ReadonlyRootfs"] is True
    status = gateway.exec("cat", "/proc/1/status").stdout  # the gateway process itself
    uid = re.search(r"^Uid:\s+(\d+)\s+(\d+)", status, re.MULTILINE)
    gid = re.search(r"^Gid:\s+(\d+)\s+(\d+)", status, re.MULTILINE)
    assert uid and gid and uid.groups() == ("10001", "10001") and gid.groups() == ("10001", "10001"), status
    assert "python -m router serve" in gateway.exec("cat", "/proc/1/cmdline").stdout.replace("\0", " ")
    for path in ("/app/written", "/opt/probe-router/cache/written", "/written"):
        write = gateway.exec("python", "-c", f"open('{path}', 'w')")
        assert write.returncode != 0 and "Read-only file system" in write.stderr, (path, write)
    # the scorer, config and probes the non-root user runs with are readable by it (and owned by root)
    assert gateway.exec("python", "-c", "open('/opt/probe-router/cache/SmolLM2-135M-Instruct/model.safetensors',"
                                        "'rb').read(16)").returncode == 0


def test_ready_and_healthy(gateway: Gateway, gateway_names: list[str]) -> None:
    body = httpx.get(f"{gateway.url}/ready", timeout=30).json()
    assert body["ready"] is True and body["scorer"] == "up"
    assert {name for name, state in body["backends"].items() if state["healthy"]} == set(gateway_names)
    # the image's HEALTHCHECK (every 15 s) reports the container healthy
    deadline = time.monotonic() + 60
    while (health := inspect("container", gateway.name)["State"]["Health"])["Status"] != "healthy":
        assert health["Status"] == "starting" and time.monotonic() < deadline, health
        time.sleep(1)


def test_the_openai_sdk_gets_routed_answers_from_the_vllm_servers(gateway: Gateway,
                                                                   gateway_names: list[str]) -> None:
    sdk = client(gateway)
    raw = sdk.chat.completions.with_raw_response.create(model="router", messages=QUESTION, max_tokens=16)
    backend = raw.headers["x-router-backend"]
    assert backend in gateway_names
    assert raw.headers["x-router-reason"] in {"threshold_met", "best_estimate", "fallback"}
    assert 0.0 < float(raw.headers["x-router-p-success"]) < 1.0
    completion = raw.parse()
    assert completion.model == f"standin-{backend}"  # the vLLM server's own answer
    assert completion.choices[0].message.content
    assert completion.usage is not None and completion.usage.completion_tokens > 0

    # both routes, by the per-request threshold: every estimate clears 0, none clears 1
    cheap, dear = gateway_names
    for threshold, expected in (("0", cheap), ("1", dear)):
        raw = sdk.chat.completions.with_raw_response.create(
            model="router", messages=QUESTION, max_tokens=4, extra_headers={"x-router-threshold": threshold})
        assert raw.headers["x-router-backend"] == expected
        assert raw.parse().model == f"standin-{expected}"

    stream = sdk.chat.completions.create(model="router", messages=QUESTION, max_tokens=8, stream=True,
                                         stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8


def test_metrics_on_the_internal_port_only(gateway: Gateway) -> None:
    client(gateway).chat.completions.create(model="router", messages=QUESTION, max_tokens=2)
    text = httpx.get(gateway.metrics_url, timeout=10).text
    requests = [line for line in text.splitlines() if line.startswith("router_requests_total{")]
    assert requests and sum(float(line.split()[-1]) for line in requests) >= 1
    assert "router_scorer_seconds_count" in text
    assert httpx.get(f"{gateway.url}/metrics", timeout=10).status_code == 404  # not on the public port


def test_sigterm_lets_requests_in_flight_finish(image: str, backend_urls: dict[str, str], cleanup: list[Any],
                                                figures: dict[str, Any]) -> None:
    """`docker stop` sends SIGTERM to the gateway (PID 1, the ENTRYPOINT's exec form): requests in flight get
    their whole answer, and the process exits 0 on its own, within the grace period given (the compose files give
    the gateway 40 s: server.shutdown_timeout_s is 30 s, docker's default grace 10 s)."""
    gateway = run_gateway("stop", free_port(), free_port(), backend_urls)
    cleanup.append(gateway)
    gateway.wait_ready()
    sdk = client(gateway)
    tokens = 48
    # ignore_eos (a vLLM sampling field, passed through untouched) makes each answer exactly `tokens` long
    long_answer = {"messages": QUESTION, "max_tokens": tokens, "extra_body": {"ignore_eos": True}}

    def streamed() -> tuple[str | None, int]:
        chunks = list(sdk.chat.completions.create(model="router", stream=True,
                                                  stream_options={"include_usage": True}, **long_answer))
        finish = next(c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason)
        return finish, chunks[-1].usage.completion_tokens if chunks[-1].usage else 0

    def whole() -> tuple[str | None, int]:
        completion = sdk.chat.completions.create(model="router", **long_answer)
        return completion.choices[0].finish_reason, completion.usage.completion_tokens if completion.usage else 0

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        answers = [pool.submit(streamed), pool.submit(whole)]
        deadline = time.monotonic() + 60  # until both are in flight at the gateway
        while _in_flight(gateway) < 2:
            assert time.monotonic() < deadline, "the requests never reached the gateway"
            time.sleep(0.05)
        stopped = time.monotonic()
        unfinished = sum(not answer.done() for answer in answers)
        docker("stop", "--time", "40", gateway.name, timeout_s=90)  # returns once the container has exited
        figures["sigterm_to_exit_with_2_answers_in_flight_s"] = round(time.monotonic() - stopped, 1)
        results = [answer.result(timeout=120) for answer in answers]
    assert unfinished == 2, "an answer was complete before the stop: make them longer"
    assert results == [("length", tokens), ("length", tokens)]
    state = inspect("container", gateway.name)["State"]
    assert state["ExitCode"] == 0 and not state["OOMKilled"], (state, gateway.logs())  # 137: killed at the end
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{gateway.url}/health", timeout=5)


def _in_flight(gateway: Gateway) -> float:
    try:
        text = httpx.get(gateway.metrics_url, timeout=5).text
    except httpx.TransportError:
        return 0.0
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("router_requests_in_flight"))


# --------------------------------------------------------------------------------------------------------------
# What the image holds

COMPILER = re.compile(r"(?:[\w-]+-)?(?:gcc|g\+\+|cc|c\+\+|cpp|clang|clang\+\+|tcc|cc1|cc1plus|collect2|ld|as)"
                      r"(?:-\d+(?:\.\d+)*)?")
BIN_DIRS = ("bin/", "sbin/", "usr/bin/", "usr/sbin/", "usr/local/bin/", "usr/local/sbin/", "opt/venv/bin/")
PEM = re.compile(rb"-----BEGIN CERTIFICATE-----\s+(.+?)\s+-----END CERTIFICATE-----", re.DOTALL)


def certificates(pem: bytes) -> set[bytes]:
    """The certificates of a PEM bundle, as their base64 bodies without white space."""
    return {re.sub(rb"\s+", b"", body) for body in PEM.findall(pem)}


def files_of(image: str, tmp_path: Path) -> Iterator[tuple[tarfile.TarInfo, tarfile.TarFile]]:
    """Every member of the image's filesystem (docker export of a container that never ran)."""
    name = docker("create", image).stdout.strip()
    archive = tmp_path / "image.tar"
    try:
        docker("export", "--output", str(archive), name, timeout_s=600)
    finally:
        docker("rm", name)
    with tarfile.open(archive) as tar:
        for member in tar:
            yield member, tar


@pytest.mark.skipif(not HOST_CA_BUNDLE.is_file(), reason=f"this host has no {HOST_CA_BUNDLE}")
def test_no_compiler_and_no_ca_bundle_of_the_build_host(image: str, tmp_path: Path,
                                                        figures: dict[str, Any]) -> None:
    """The host's bundle went into the build as a secret (scripts/build_image.sh): no file of the image may be
    that bundle, nor hold a certificate this host added to it (Debian keeps local CAs, such as a
    TLS-intercepting proxy's, in LOCAL_CAS). Nor may the image hold a compiler or a linker."""
    host_bundle = HOST_CA_BUNDLE.read_bytes()
    local = set().union(*(certificates(path.read_bytes()) for path in LOCAL_CAS.rglob("*.crt"))) \
        if LOCAL_CAS.is_dir() else set()
    assert local <= certificates(host_bundle), f"{LOCAL_CAS} is not in {HOST_CA_BUNDLE}: run update-ca-certificates"
    figures["host_local_ca_certificates_checked"] = len(local)

    compilers, leaks = [], []
    for member, tar in files_of(image, tmp_path):
        path = member.name.removeprefix("./")
        if path.startswith(BIN_DIRS) and COMPILER.fullmatch(path.rsplit("/", 1)[-1]):
            compilers.append(path)
        if member.isfile() and member.size < 8 * 1024 * 1024:
            extracted = tar.extractfile(member)
            content = extracted.read() if extracted else b""
            if content == host_bundle or (b"CERTIFICATE" in content and certificates(content) & local):
                leaks.append(path)
    assert compilers == [], f"compilers in the image: {compilers}"
    assert leaks == [], f"the build host's CA certificates are in the image: {leaks}"
    assert not [env for env in inspect("image", image)["Config"]["Env"] if "PIP_CERT" in env or "secrets" in env]
