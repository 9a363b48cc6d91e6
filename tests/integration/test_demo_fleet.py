"""`make demo-fleet` for real (its script, scripts/demo_fleet.py; make adds only the set-up): nginx in front of
two gateway replicas (scorer.kind vllm, state in Redis), a vLLM CPU pooling scorer and the two vLLM CPU stand-in
backends. One start (about two minutes here) serves every test below, in order; the last stops the demo's
process group with SIGTERM and checks that nothing survives.

Learning: answers rated on the replica that did not give them teach the probes (the fleet's learner, whichever
replica holds the lock), and both replicas serve the promoted version.

Faults, with the real processes: a replica SIGKILLed under a bounded load behind the balancer, then restarted on
its port (it rejoins); the shared vLLM scorer SIGKILLed under a bounded load behind the balancer, then restarted
on its port (both replicas score again); Redis stopped and started again.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest

from router.config import load_settings
from router.scorer.source import resolve_model
from scripts.demo import CONFIG, start_scorer
from scripts.demo_fleet import replica_env, start_replica, work_dir
from scripts.redis_server import RedisServer
from scripts.vllm_cpu import VllmServer, wait_ready
from tests.conftest import ROOT
from tests.integration.test_demo_stop import alive, descendants, port_in_use

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "What is 6 * 7?"}]
REQUESTS = 40
CONCURRENCY = 4
KILL_AFTER = 6
LEARNING = {"MIN_LABELS": "20", "GUARD_MIN_LABELS": "10", "GUARD_Z": "0", "REFIT_EVERY_LABELS": "20",
            "REFIT_INTERVAL_S": "1", "RELOAD_INTERVAL_S": "0.5", "CANDIDATES": '["recalibrate"]'}
RATED = 100
RIGHT = 0.3  # the share of answers rated right (the shipped probes say about 0.9 on these prompts)


@dataclass
class Fleet:
    demo: subprocess.Popen[bytes]
    ports: dict[str, int]
    env: dict[str, str]  # the demo's
    log: Path
    # started by the tests in place of what they killed, stopped by them
    adopted: list[subprocess.Popen[bytes] | VllmServer] = field(default_factory=list)

    def stop_adopted(self) -> None:
        for process in self.adopted:
            if isinstance(process, VllmServer):
                process.stop()  # its process group: the server and its engine
            elif process.poll() is None:
                process.terminate()
                process.wait(30)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports['balancer']}"

    def replica_url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.ports[f'replica{i}']}"

    def replica_pid(self, i: int) -> int:
        port = str(self.ports[f"replica{i}"])
        for pid in descendants(self.demo.pid):
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"router\0serve" in cmdline and f"ROUTER_SERVER__PORT={port}".encode() in environ:
                return pid
        raise AssertionError(f"no replica on port {port} under the demo")

    def scorer_pid(self) -> int:
        """The demo's vLLM pooling scorer (the leader of its own process group, its engine in it)."""
        port = f"--port\0{self.ports['scorer']}\0".encode()
        for pid in descendants(self.demo.pid):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"vllm.entrypoints.openai.api_server" in cmdline and port in cmdline:
                return pid
        raise AssertionError(f"no vLLM scorer on port {self.ports['scorer']} under the demo")


def quiet_port(taken: set[int]) -> int:
    """A free port below Linux's ephemeral range (32768-60999), where no process's outgoing or auto-bound
    sockets land: the demo binds some of its ports minutes after choosing them, while vLLM's workers bind
    ephemeral ports of their own."""
    for _ in range(200):
        port = random.randrange(20000, 32000)
        if port not in taken and not port_in_use(port):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port below 32000")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    ports: dict[str, int] = {}
    for name in ("small", "large", "scorer", "redis", "replica0", "replica1", "balancer"):
        ports[name] = quiet_port(set(ports.values()))
    env = dict(os.environ,
               QWEN_SMALL_URL=f"http://127.0.0.1:{ports['small']}/v1",
               QWEN_LARGE_URL=f"http://127.0.0.1:{ports['large']}/v1",
               DEMO_SCORER_PORT=str(ports["scorer"]), DEMO_REDIS_PORT=str(ports["redis"]),
               DEMO_REPLICA_PORTS=f"{ports['replica0']},{ports['replica1']}",
               ROUTER_SERVER__PORT=str(ports["balancer"]),
               # the learner as make demo-fleet runs it, promoting after tens of ratings instead of hundreds
               **{f"ROUTER_LEARNING__{k}": v for k, v in LEARNING.items()})
    log = tmp_path_factory.mktemp("demo-fleet") / "demo.log"
    with log.open("wb") as out:
        demo = subprocess.Popen([sys.executable, "-m", "scripts.demo_fleet"], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    fleet = Fleet(demo, ports, env, log)
    try:
        deadline = time.monotonic() + 600
        while "probe-router is ready at" not in log.read_text(errors="replace"):
            assert demo.poll() is None, log.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "the fleet did not become ready in 600 s"
            time.sleep(2)
        yield fleet
    finally:
        fleet.stop_adopted()
        for pid in descendants(demo.pid) | {demo.pid}:  # whatever a failed run left, by pid
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def _routed(url: str) -> str:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(model="router", messages=MESSAGES, max_tokens=8)
    assert raw.parse().choices[0].message.content
    return raw.headers["x-router-request-id"]


def test_the_balancer_serves_the_openai_sdk_and_feedback_from_either_replica(fleet: Fleet) -> None:
    text = fleet.log.read_text(errors="replace")
    assert f"probe-router is ready at http://127.0.0.1:{fleet.ports['balancer']}/v1" in text
    client = openai.OpenAI(base_url=f"{fleet.url}/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(model="router", messages=MESSAGES, max_tokens=8, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    for asked, rated in ((0, 1), (1, fleet.url), (0, fleet.url)):
        answer_id = _routed(fleet.replica_url(asked))
        where = rated if isinstance(rated, str) else fleet.replica_url(rated)
        r = httpx.post(f"{where}/v1/feedback", json={"id": answer_id, "correct": True})
        assert r.status_code == 200, r.text
        assert httpx.post(f"{fleet.url}/v1/feedback", json={"id": answer_id, "correct": True}).status_code == 404


def _metric_lines(url: str, name: str) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in httpx.get(f"{url}/metrics").text.splitlines() if line.startswith(name)}


def _stored(urls: list[str]) -> float:
    """Ratings stored as labelled examples by the replicas (and nothing else: no rating without its features)."""
    outcomes: Counter[str] = Counter()
    for u in urls:
        for key, value in _metric_lines(u, "router_learning_examples_total").items():
            outcomes[key.split('outcome="')[1].split('"')[0]] += value
    assert set(outcomes) <= {"stored"}, outcomes
    return outcomes["stored"]


def test_ratings_on_one_replica_change_what_the_other_serves_after_a_promotion(fleet: Fleet) -> None:
    urls = [fleet.replica_url(0), fleet.replica_url(1)]
    run = uuid.uuid4().hex[:8]

    def asked(i: int) -> dict[str, object]:  # prompts never asked before: no score cache, no earlier rating
        return {"model": "router", "max_tokens": 1,
                "messages": [{"role": "user", "content": f"[{run}] What is {i} * 7?"}]}

    def estimates() -> list[dict[str, float]]:
        """Each replica's mean estimate per backend over 8 prompts like the rated ones, none of them rated."""
        out = []
        for u in urls:
            routes = [httpx.post(f"{u}/v1/route", json=asked(RATED + i)).json()["estimates"] for i in range(8)]
            out.append({b: sum(r[b] for r in routes) / len(routes) for b in routes[0]})
        return out

    before = estimates()
    assert before[0] == pytest.approx(before[1])
    stored = _stored(urls)  # the ratings of the tests before this one
    rng, answered = random.Random(0), Counter()
    with httpx.Client(timeout=120) as client:
        for i in range(RATED):  # each answer rated on the replica that did not give it
            r = client.post(f"{urls[i % 2]}/v1/chat/completions", json=asked(i))
            assert r.status_code == 200, r.text
            answered[r.headers["x-router-backend"]] += 1
            rated = client.post(f"{urls[(i + 1) % 2]}/v1/feedback", json={"id": r.headers["x-router-request-id"],
                                                                          "correct": rng.random() < RIGHT})
            assert rated.status_code == 200, rated.text
    assert _stored(urls) - stored == RATED  # every rating joined the features the other replica kept

    deadline = time.monotonic() + 90
    while True:  # the learner recalibrates the backend(s) rated often enough; both replicas serve it
        versions = [_metric_lines(u, "router_probe_version") for u in urls]
        promoted = {k for k, v in versions[0].items() if v >= 2}
        if promoted and all(versions[1].get(k, 0) >= 2 for k in promoted):
            break
        assert time.monotonic() < deadline, (f"no promotion served by both replicas within 90 s: {versions}; "
                                             f"answered {dict(answered)}")
        time.sleep(1)
    for _ in range(10):  # read while no further promotion lands (the other backend's may still come)
        after = estimates()
        if [_metric_lines(u, "router_probe_version") for u in urls] == [versions[0]] * 2:
            break
        versions = [_metric_lines(u, "router_probe_version") for u in urls]
        promoted = {k for k, v in versions[0].items() if v >= 2}
        time.sleep(2)
    assert after[0] == pytest.approx(after[1])  # both replicas serve the same versions
    backends = [k.split('backend="')[1].split('"')[0] for k in promoted]
    print(f"\nanswered {dict(answered)}, promoted {backends}: mean estimates {before[0]} -> {after[0]}")
    for backend in backends:  # recalibrated toward the realised 0.3 from the shipped probes' confidence
        assert after[0][backend] < before[0][backend] - 0.2


def test_conversations_through_the_balancer_continue_on_either_replica(fleet: Fleet) -> None:
    clients = [openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
               for url in (fleet.replica_url(0), fleet.replica_url(1), fleet.url)]
    previous = None
    for i, client in enumerate(clients):  # each turn on another replica: the conversation is in Redis
        answer = client.responses.create(model="router", input="What is 2+2?" if i == 0 else "And times 3?",
                                         previous_response_id=previous, max_output_tokens=6, stream=i == 2)
        if i == 2:
            events = list(answer)
            assert events[-1].type == "response.completed"
        else:
            assert answer.output_text
            previous = answer.id
    session, messages, reasons = {"x-session-id": "fleet-conversation"}, [], []
    for i, client in enumerate(clients):
        messages.append({"role": "user", "content": MESSAGES[0]["content"] if i == 0 else "And then?"})
        raw = client.chat.completions.with_raw_response.create(model="router", messages=messages, max_tokens=6,
                                                               extra_headers=session)
        messages.append({"role": "assistant", "content": raw.parse().choices[0].message.content or ""})
        reasons.append((raw.headers["x-router-backend"], raw.headers["x-router-reason"]))
    assert [r for _, r in reasons[1:]] == ["affinity", "affinity"]  # the pin is shared by the replicas
    assert len({b for b, _ in reasons}) == 1
    decision = httpx.post(f"{fleet.url}/v1/route", headers=session,
                          json={"model": "router", "messages": messages}).json()
    assert (decision["backend"], decision["reason"]) == (reasons[0][0], "affinity")


async def _load(url: str, on_answer) -> list[httpx.Response | Exception]:  # type: ignore[no-untyped-def]
    body = {"model": "router", "max_tokens": 16, "messages": MESSAGES}
    slots = asyncio.Semaphore(CONCURRENCY)
    run = uuid.uuid4().hex[:8]
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(keepalive_expiry=None)) as client:
        async def one(i: int) -> httpx.Response | Exception:
            # a prompt no other request (of this load or an earlier one) asked: the score cache would decide a
            # repeated one without the scorer
            asked = {**body, "messages": [{"role": "user", "content": f"[{run}] What is {i} * 7?"}]}
            async with slots:
                try:
                    if i % 2:  # a stream, read to its end
                        async with client.stream("POST", f"{url}/v1/chat/completions",
                                                 json={**asked, "stream": True}) as r:
                            await r.aread()
                    else:
                        r = await client.post(f"{url}/v1/chat/completions", json=asked)
                except httpx.HTTPError as e:
                    on_answer(e)
                    return e
                on_answer(r)
                return r
        return await asyncio.gather(*(one(i) for i in range(REQUESTS)))


def test_a_replica_sigkilled_under_load_then_restarted_rejoins(fleet: Fleet, tmp_path: Path) -> None:
    answered: list[object] = []
    victim = fleet.replica_pid(0)

    def on_answer(r: object) -> None:
        answered.append(r)
        if len(answered) == KILL_AFTER:
            os.kill(victim, signal.SIGKILL)

    results = asyncio.run(_load(fleet.url, on_answer))
    outcomes = Counter()
    for r in results:
        if isinstance(r, Exception):
            outcomes[type(r).__name__] += 1
        elif r.status_code != 200:
            outcomes[f"HTTP {r.status_code}"] += 1
        elif r.headers.get("content-type", "").startswith("text/event-stream") and b"[DONE]" not in r.content:
            outcomes["stream cut short"] += 1
        else:
            outcomes["complete"] += 1
    print(f"\n{REQUESTS} requests, {CONCURRENCY} at a time, replica SIGKILLed after {KILL_AFTER}: {dict(outcomes)}")
    # Non-streamed requests in flight on the killed replica had no byte of an answer yet: nginx retries them on
    # the other replica. Only streams that had started on it can end early (at most those in flight at the kill).
    assert outcomes["complete"] >= REQUESTS - CONCURRENCY
    assert set(outcomes) <= {"complete", "stream cut short", "RemoteProtocolError", "ReadError"}
    assert all(_routed(fleet.url) for _ in range(4))  # the balancer sends everything to the survivor

    port = fleet.ports["replica0"]
    scorer_url = f"http://127.0.0.1:{fleet.ports['scorer']}/v1"
    redis_url = f"redis://127.0.0.1:{fleet.ports['redis']}/0"
    env = replica_env(fleet.env, port, scorer_url, redis_url, work_dir(fleet.ports["balancer"]) / "learning")
    restarted = start_replica(env, tmp_path / "replica.log")
    fleet.adopted.append(restarted)  # it serves the tests below in the killed replica's place
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{fleet.replica_url(0)}/ready", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert restarted.poll() is None and time.monotonic() < deadline, (tmp_path / "replica.log").read_text()
        time.sleep(1)
    time.sleep(5)  # nginx's fail_timeout: the restarted replica is offered traffic again
    served_before = _requests_served(fleet.replica_url(0))
    for _ in range(6):
        _routed(fleet.url)
    assert _requests_served(fleet.replica_url(0)) > served_before  # it rejoined the rotation


def test_the_scorer_sigkilled_under_load_behind_the_balancer_then_restarted(fleet: Fleet, tmp_path: Path) -> None:
    """The single gateway's test (test_vllm_zz_faults) through the balancer, with the scorer both replicas share."""
    settings = load_settings(CONFIG)
    scorer = fleet.scorer_pid()
    answered: list[object] = []

    def on_answer(r: object) -> None:
        answered.append(r)
        if len(answered) == KILL_AFTER:
            os.killpg(scorer, signal.SIGKILL)  # the scorer and its engine, outright
            deadline = time.monotonic() + 10
            while alive(scorer) and time.monotonic() < deadline:
                time.sleep(0.05)

    results = asyncio.run(_load(fleet.url, on_answer))
    assert not alive(scorer)
    errors = [r for r in results if isinstance(r, Exception)]
    assert not errors, errors  # none lost: every request answered through the balancer
    responses = [r for r in results if isinstance(r, httpx.Response)]
    assert [r.status_code for r in responses] == [200] * REQUESTS
    for r in responses:
        if r.headers["content-type"].startswith("text/event-stream"):
            assert r.content.rstrip().endswith(b"data: [DONE]")  # the backends are up: every stream complete
    unscored = [r for r in responses if r.headers["x-router-reason"] == "unscored"]
    routes = Counter((r.headers["x-router-reason"], r.headers.get("x-router-stage")) for r in responses)
    print(f"\nscorer killed under load behind the balancer: {REQUESTS} requests, {len(unscored)} unscored, "
          f"0 unanswered; (reason, stage): {dict(routes)}")
    assert len(unscored) >= REQUESTS - KILL_AFTER - CONCURRENCY
    assert all(r.headers["x-router-backend"] == settings.policy.fallback for r in unscored)
    assert all("x-router-scorer-ms" not in r.headers for r in unscored)
    for i in (0, 1):  # both replicas lost the scorer, found out at once, and say so
        metrics = httpx.get(f"{fleet.replica_url(i)}/metrics").text
        assert 'router_scorer_errors_total{kind="timeout"}' not in metrics  # none waited out scorer.timeout_s
        assert 'router_scorer_errors_total{kind="down"}' in metrics  # refused at once by the open circuit
        ready = httpx.get(f"{fleet.replica_url(i)}/ready", timeout=10)
        assert ready.status_code == 503 and ready.json()["scorer"] == "down", ready.text
        assert "router_scorer_up 0.0" in httpx.get(f"{fleet.replica_url(i)}/metrics").text

    folder = resolve_model(settings.scorer.model, settings.scorer.cache_dir)
    core = len(settings.backends) % (os.cpu_count() or 1)  # the demo's core for it
    restarted, _ = start_scorer(settings, folder, tmp_path, core, lambda _: None, port=fleet.ports["scorer"])
    fleet.adopted.append(restarted)  # it serves the tests below in the killed scorer's place
    wait_ready([restarted], timeout_s=300)
    for i in (0, 1):  # scoring resumes on both replicas
        deadline = time.monotonic() + 60
        for n in itertools.count():  # distinct prompts, so the score cache cannot answer for the scorer
            r = httpx.post(f"{fleet.replica_url(i)}/v1/chat/completions", timeout=60, json={
                "model": "router", "max_tokens": 2,
                "messages": [{"role": "user", "content": f"Is {n} prime? (replica {i})"}]})
            assert r.status_code == 200
            if r.headers["x-router-reason"] != "unscored":
                break
            assert time.monotonic() < deadline, f"replica {i} did not score again within 60 s of the restart"
            time.sleep(0.5)
        assert "x-router-scorer-ms" in r.headers
        assert httpx.get(f"{fleet.replica_url(i)}/ready", timeout=10).json()["scorer"] == "up"
        assert "router_scorer_up 1.0" in httpx.get(f"{fleet.replica_url(i)}/metrics").text


def _requests_served(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("router_requests_total"))


def test_redis_stopped_and_restarted_behind_the_balancer(fleet: Fleet, tmp_path: Path) -> None:
    redis_pid = next(pid for pid in descendants(fleet.demo.pid)
                     if b"redis-server" in Path(f"/proc/{pid}/cmdline").read_bytes())
    os.kill(redis_pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while alive(redis_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    ids = [_routed(fleet.url) for _ in range(4)]  # answered without Redis: no 5xx
    assert ids
    replacement = RedisServer(tmp_path, fleet.ports["redis"])
    replacement.start()
    try:
        time.sleep(3)  # state.retry_after_s (2 s): the replicas ask Redis again
        answer_id = _routed(fleet.replica_url(1))
        assert httpx.post(f"{fleet.replica_url(0)}/v1/feedback", json={"id": answer_id, "score": 1}).status_code == 200
        up = [float(line.rsplit(" ", 1)[1]) for url in (fleet.replica_url(0), fleet.replica_url(1))
              for line in httpx.get(f"{url}/metrics").text.splitlines() if line.startswith("router_state_up")]
        assert up == [1.0, 1.0]
    finally:
        replacement.stop()


def test_sigterm_to_the_group_leaves_nothing_behind(fleet: Fleet) -> None:
    fleet.stop_adopted()  # the replica a test restarted is not the demo's
    started = descendants(fleet.demo.pid)
    assert len(started) >= 6  # the demo, nginx, two replicas, three vLLM servers at least
    os.killpg(fleet.demo.pid, signal.SIGTERM)
    fleet.demo.wait(180)
    deadline = time.monotonic() + 120
    while (left := {p for p in started if alive(p)}) and time.monotonic() < deadline:
        time.sleep(1)
    assert not left, f"still running: {sorted(left)}"
    assert not any(port_in_use(p) for p in fleet.ports.values()), fleet.ports
    assert "stopping the balancer, the replicas, Redis and the vLLM servers" in fleet.log.read_text()
