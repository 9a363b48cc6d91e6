"""A real Prometheus scrapes real gateways on 127.0.0.1; every PromQL query of the Grafana dashboard returns data,
and the scraped values match the requests that were sent.

Two gateways share the tiny test scorer, constant probes (small 0.70, large 0.95; threshold 0.8) and fake
OpenAI backends that report 11 prompt + 7 completion tokens per answer:

- ``main``: small ($1/$2 per Mtok) and large ($10/$20): routed, explicit, streamed and rated answers;
- ``faulty``: its scorer always times out (unscored), its 'large' answers 503 (so routed requests fail over to
  small) and a 'dead' backend listens nowhere (explicit requests get a 502; its circuit opens).

Each gateway serves /metrics on its own metrics port, as docker-compose.yml runs it. The vLLM job scrapes a stub
exporting the vLLM metric names that the dashboard uses.
"""

from __future__ import annotations

import math
import re
import subprocess
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest

from router.app import create_app, create_metrics_app
from router.config import ScoreCacheConfig, ScorerConfig, Settings
from router.routing import load_probe_groups
from router.scorer.features import FeatureExtractor
from router.scorer.recipe import ScorerInfo
from tests.deploy.test_grafana import LEARNING_ROW, dashboard_exprs_by_row
from tests.deploy.tools import DASHBOARD, PROMETHEUS_CONFIG, run, tool
from tests.support.probes import write_constant_probes
from tests.support.servers import FakeBackend, free_port, serve

PROMPT_TOKENS, COMPLETION_TOKENS = 11, 7  # FakeBackend's usage for every answer
PRICES = {"small": (1.0, 2.0), "large": (10.0, 20.0), "dead": (0.5, 1.0)}  # USD per Mtok: input, output
REFERENCE = "large"  # the dearest backend: the reference policy's
ROUNDS = 2  # the same traffic twice, a scrape apart, so that every rate() has two samples to compare
SCRAPE_S = 1.0
MESSAGES = [{"role": "user", "content": "What is 2 + 2?"}]
# Grafana's variables, as a dashboard viewer's defaults would set them
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "5m", "$backend": ".*"}
ROWS = dashboard_exprs_by_row(yaml.safe_load(DASHBOARD.read_text()))
EXPRS = [pytest.param(expr, id=f"{title} {i}") for i, (title, expr) in
         enumerate(e for row, exprs in ROWS.items() if not row.startswith(LEARNING_ROW) for e in exprs)]
LEARNING_EXPRS = [pytest.param(expr, id=f"{title} {i}") for i, (title, expr) in
                  enumerate(e for row, exprs in ROWS.items() if row.startswith(LEARNING_ROW) for e in exprs)]


def to_promql(expr: str) -> str:
    for variable, value in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"a Grafana variable the test does not know: {expr}"
    return expr


def usd(backend: str, answers: float = 1) -> float:
    inp, out = PRICES[backend]
    return answers * (PROMPT_TOKENS * inp + COMPLETION_TOKENS * out) / 1e6


# --------------------------------------------------------------------------------------------------------------
# Prometheus


@dataclass
class Prometheus:
    url: str

    def query(self, expr: str) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
        return body["data"]["result"]

    def values(self, expr: str, by: str | None = None) -> dict[str | None, float]:
        return {(r["metric"].get(by) if by else None): float(r["value"][1]) for r in self.query(expr)}

    def value(self, expr: str) -> float:
        found = self.values(expr)
        return found[None] if found else math.nan

    def wait_for_scrape_after(self, moment: float, timeout_s: float = 20) -> None:
        """Until every target has been scraped since ``moment`` (wall clock)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            oldest = self.value("min(timestamp(up))")
            if oldest > moment:
                return
            time.sleep(0.25)
        raise AssertionError(f"Prometheus did not scrape every target within {timeout_s}s: {self.query('up')}")


def scrape_config(gateways: list[str], vllm: str, own: str) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml with every target moved to 127.0.0.1 and a 1 s interval."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"] = {"scrape_interval": f"{SCRAPE_S:g}s", "scrape_timeout": f"{SCRAPE_S:g}s",
                        "evaluation_interval": f"{SCRAPE_S:g}s"}
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"probe-router", "scorer", "vllm", "prometheus"}, "a new scrape job: teach this test about it"
    jobs["probe-router"].pop("dns_sd_configs")  # compose's service discovery; here, the gateways' addresses
    jobs["probe-router"]["static_configs"] = [{"targets": gateways}]
    jobs["scorer"]["static_configs"] = [{"targets": [vllm]}]  # the vLLM stub stands in for the pooling server
    for static in jobs["vllm"]["static_configs"]:  # keep the labels (backend) of each vLLM target
        static["targets"] = [vllm]
    jobs["prometheus"]["static_configs"] = [{"targets": [own]}]
    return config


@contextmanager
def prometheus(folder: Path, targets: Callable[[str], dict[str, Any]]) -> Iterator[Prometheus]:
    binary = tool("prometheus")
    address = f"127.0.0.1:{free_port()}"
    config = folder / "prometheus.yml"
    config.write_text(yaml.safe_dump(targets(address)))
    checked = run([tool("promtool"), "check", "config", str(config)])
    assert checked.returncode == 0, f"promtool check config:\n{checked.stdout}{checked.stderr}"
    log = folder / "prometheus.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={folder / 'data'}",
             f"--web.listen-address={address}", "--log.level=warn"],
            stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        url = f"http://{address}"
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                pytest.fail(f"prometheus exited with {proc.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"prometheus did not become ready in 30 s:\n{log.read_text()}")
            time.sleep(0.1)
        yield Prometheus(url)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


# --------------------------------------------------------------------------------------------------------------
# vLLM stand-in for the vllm job: the vLLM metric names the dashboard reads


class VllmMetrics:
    def __init__(self, dashboard_text: str) -> None:
        self.registry = CollectorRegistry()
        self.counters: list[Counter] = []
        self.gauges: list[Gauge] = []
        for name in sorted(set(re.findall(r"vllm:[a-z_]+", dashboard_text))):
            if name.endswith("_total"):
                self.counters.append(Counter(name.removesuffix("_total"), name, ["model_name"], registry=self.registry))
            else:
                self.gauges.append(Gauge(name, name, ["model_name"], registry=self.registry))
        self.app = FastAPI()
        self.app.add_api_route("/metrics", self._metrics, methods=["GET"])

    async def _metrics(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    def step(self) -> None:
        for counter in self.counters:
            counter.labels("stub").inc(COMPLETION_TOKENS)
        for gauge in self.gauges:
            gauge.labels("stub").set(0.5)


# --------------------------------------------------------------------------------------------------------------
# The gateways and the traffic


def backend(name: str, url: str, probe: Path | None) -> dict[str, Any]:
    inp, out = PRICES[name]
    return {"name": name, "base_url": f"{url}/v1", "model": f"org/{name}", "input_cost_per_mtok": inp,
            "output_cost_per_mtok": out, "probe": probe, "connect_timeout_s": 1}


@dataclass
class Sent:
    """What the clients saw: answers by (backend, reason), estimates, ratings, failed calls."""

    answers: Tally[tuple[str, str]] = field(default_factory=Tally)
    estimates: list[float] = field(default_factory=list)
    ratings: list[tuple[str, float]] = field(default_factory=list)
    failures: list[int] = field(default_factory=list)

    def answered(self, headers: httpx.Headers) -> None:
        self.answers[headers["x-router-backend"], headers["x-router-reason"]] += 1
        if "x-router-p-success" in headers:
            self.estimates.append(float(headers["x-router-p-success"]))

    def by_backend(self) -> Tally[str]:
        tally: Tally[str] = Tally()
        for (name, _), n in self.answers.items():
            tally[name] += n
        return tally


@dataclass
class Live:
    prometheus: Prometheus
    sent: Sent
    gateways: dict[str, str]


def rate(url: str, answer_id: str, rating: dict[str, Any]) -> str:
    response = httpx.post(f"{url}/v1/feedback", json={"id": answer_id, **rating}, timeout=10)
    assert response.status_code == 200, f"/v1/feedback: {response.status_code} {response.text}"
    return response.json()["backend"]


def traffic(main: str, faulty: str, sent: Sent) -> None:
    a = openai.OpenAI(base_url=f"{main}/v1", api_key="unused", max_retries=0, timeout=30)
    b = openai.OpenAI(base_url=f"{faulty}/v1", api_key="unused", max_retries=0, timeout=30)
    ratings = [{"correct": True}, {"correct": False}, {"score": 0.5}]
    rated = [
        a.chat.completions.with_raw_response.create(model="router", messages=MESSAGES),  # large, threshold_met
        a.chat.completions.with_raw_response.create(model="router", messages=MESSAGES,  # small, threshold_met
                                                    extra_headers={"x-router-threshold": "0.5"}),
        a.chat.completions.with_raw_response.create(model="small", messages=MESSAGES),  # small, explicit
    ]
    for raw, rating in zip(rated, ratings, strict=True):
        sent.answered(raw.headers)
        answer_id = raw.headers.get("x-router-request-id") or raw.parse().id
        sent.ratings.append((rate(main, answer_id, rating), float(rating.get("score", rating.get("correct")))))
    streams = [
        a.chat.completions.with_raw_response.create(model="router", messages=MESSAGES, stream=True,
                                                    stream_options={"include_usage": True}),
        a.chat.completions.with_raw_response.create(model="router", messages=MESSAGES, stream=True),
        a.chat.completions.with_raw_response.create(model="small", messages=MESSAGES, stream=True),
    ]
    for raw in streams:
        chunks = list(raw.parse())
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()
        sent.answered(raw.headers)
    sent.answered(a.completions.with_raw_response.create(model="router", prompt="2 + 2 =", max_tokens=5).headers)

    failover = b.chat.completions.with_raw_response.create(model="router", messages=MESSAGES)
    assert (failover.headers["x-router-backend"], failover.headers["x-router-reason"]) == ("small", "failover")
    sent.answered(failover.headers)
    for model in ("large", "dead"):  # a backend answering 503, one that refuses connections
        with pytest.raises(openai.APIStatusError) as err:
            b.chat.completions.create(model=model, messages=MESSAGES)
        sent.failures.append(err.value.status_code)


@contextmanager
def small_and_large(folder: Path, info: ScorerInfo) -> Iterator[tuple[dict[str, Path], str, str]]:
    """Constant probes written to ``folder`` (small 0.70, large 0.95) and fake backends small and large that answer,
    served: (probes, small's URL, large's URL)."""
    probes = write_constant_probes(folder, info, {"small": 0.70, "large": 0.95})
    small, large = FakeBackend("org/small", "small says 4"), FakeBackend("org/large", "large says 4")
    with serve(small.app) as small_url, serve(large.app) as large_url:
        yield probes, small_url, large_url


@contextmanager
def gateway(settings: Settings) -> Iterator[tuple[str, str]]:
    """The gateway as `python -m router serve` runs it with server.metrics_port: (API URL, metrics host:port)."""
    app = create_app(settings, load_probe_groups(settings))
    assert settings.server.metrics_port is not None
    with serve(app) as url, serve(create_metrics_app(app), port=settings.server.metrics_port) as metrics_url:
        assert httpx.get(f"{url}/metrics").status_code == 404  # not on the public port
        yield url, metrics_url.removeprefix("http://")


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, tiny_scorer_cfg: ScorerConfig,
         tiny_extractor: FeatureExtractor) -> Iterator[Live]:
    folder = tmp_path_factory.mktemp("prometheus")
    broken = FakeBackend("org/large", status=503)
    vllm = VllmMetrics(DASHBOARD.read_text())
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens here
    with (small_and_large(folder, tiny_extractor.info) as (probes, small_url, large_url),
          serve(broken.app) as broken_url, serve(vllm.app) as vllm_url):
        # no score cache: each round's (repeated) prompts must reach the scorer, whose histograms the panels read
        main = Settings(scorer=tiny_scorer_cfg.model_copy(update={"cache": ScoreCacheConfig(entries=0)}),
                        policy={"threshold": 0.8}, server={"metrics_port": free_port()},
                        backends=[backend("small", small_url, probes["small"]),
                                  backend("large", large_url, probes["large"])])
        faulty = Settings(
            scorer=tiny_scorer_cfg.model_copy(update={"timeout_s": 0.001}),  # no score arrives in time
            policy={"threshold": 0.8},
            backends=[backend("small", small_url, probes["small"]), backend("large", broken_url, probes["large"]),
                      backend("dead", closed, None)],
            resilience={"health_interval_s": 0.5, "cooldown_s": 600},
            server={"metrics_port": free_port()},
        )
        with gateway(main) as (main_url, main_metrics), gateway(faulty) as (faulty_url, faulty_metrics):
            hosts = [main_metrics, faulty_metrics]
            with prometheus(folder, lambda own: scrape_config(hosts, vllm_url.removeprefix("http://"), own)) as prom:
                prom.wait_for_scrape_after(time.time())
                sent = Sent()
                for _ in range(ROUNDS):
                    vllm.step()
                    traffic(main_url, faulty_url, sent)
                    time.sleep(0.2)  # streams' metrics are counted as their relay ends
                    prom.wait_for_scrape_after(time.time())
                yield Live(prom, sent, {"main": hosts[0], "faulty": hosts[1]})


# --------------------------------------------------------------------------------------------------------------
# The tests


@pytest.mark.parametrize("expr", EXPRS)
def test_every_dashboard_query_returns_data(live: Live, expr: str) -> None:
    result = live.prometheus.query(to_promql(expr))
    assert result, f"no data for {to_promql(expr)}"
    values = [float(r["value"][1]) for r in result]
    assert any(math.isfinite(v) for v in values), f"only NaN/Inf for {to_promql(expr)}: {result}"


def test_every_target_is_scraped(live: Live) -> None:
    up = live.prometheus.values("up", by="job")
    assert set(up) == {"probe-router", "scorer", "vllm", "prometheus"}
    assert live.prometheus.values("min by (job) (up)", by="job") == {"probe-router": 1, "scorer": 1, "vllm": 1,
                                                                     "prometheus": 1}


def test_tokens_and_cost_match_the_answers(live: Live) -> None:
    n = live.sent.by_backend()
    assert set(n) == {"small", "large"} and n["small"] >= 2 * ROUNDS
    p = live.prometheus
    assert p.values("sum by (backend) (router_prompt_tokens_total)", by="backend") == {
        b: PROMPT_TOKENS * k for b, k in n.items()}
    assert p.values("sum by (backend) (router_completion_tokens_total)", by="backend") == {
        b: COMPLETION_TOKENS * k for b, k in n.items()}
    cost = p.values("sum by (backend) (router_cost_usd_total)", by="backend")
    assert cost == {b: pytest.approx(usd(b, k)) for b, k in n.items()}
    reference = p.values("sum by (backend) (router_reference_cost_usd_total)", by="backend")
    assert reference == {b: pytest.approx(usd(REFERENCE, k)) for b, k in n.items()}
    saved = 1 - sum(usd(b, k) for b, k in n.items()) / usd(REFERENCE, n.total())
    assert p.value("1 - sum(router_cost_usd_total) / sum(router_reference_cost_usd_total)") == pytest.approx(saved)


def test_requests_are_counted_by_backend_reason_and_status(live: Live) -> None:
    p = live.prometheus
    found = {(r["metric"]["backend"], r["metric"]["reason"]): float(r["value"][1])
             for r in p.query('sum by (backend, reason) (router_requests_total{status="200"})')}
    assert found == {key: float(k) for key, k in live.sent.answers.items()}
    assert live.sent.answers["small", "failover"] == ROUNDS
    assert sorted(live.sent.failures) == sorted([502, 503] * ROUNDS)
    assert p.value('sum(router_requests_total{status=~"5.."})') == 2 * ROUNDS
    assert p.value('sum(router_upstream_errors_total{backend="large"})') >= ROUNDS  # the failovers
    assert p.value('sum(router_upstream_errors_total{backend="dead"})') >= ROUNDS
    # no score arrives within 1 ms: each request times out, or is refused at once once a pass has been timed
    scorer_errors = p.values("sum by (kind) (router_scorer_errors_total)", by="kind")
    assert set(scorer_errors) <= {"timeout", "overloaded"} and sum(scorer_errors.values()) == ROUNDS
    assert p.value("sum(router_requests_in_flight)") == 0


def test_predicted_and_realised_accuracy(live: Live) -> None:
    p, sent = live.prometheus, live.sent
    assert p.value("sum(router_predicted_success_count)") == len(sent.estimates) == 5 * ROUNDS
    assert p.value("sum(router_predicted_success_sum)") == pytest.approx(sum(sent.estimates), abs=1e-3)
    feedback = p.values("sum by (backend) (router_feedback_total)", by="backend")
    scores = p.values("sum by (backend) (router_feedback_score_total)", by="backend")
    expected_n: Tally[str] = Tally(name for name, _ in sent.ratings)
    expected_score = {name: sum(s for b, s in sent.ratings if b == name) for name in expected_n}
    assert feedback == dict(expected_n) == {"large": ROUNDS, "small": 2 * ROUNDS}
    assert scores == pytest.approx(expected_score)
    realised = p.value("sum(router_feedback_score_total) / sum(router_feedback_total)")
    assert realised == pytest.approx(1.5 / 3)


def test_backend_up_follows_the_circuits(live: Live) -> None:
    p, main, faulty = live.prometheus, live.gateways["main"], live.gateways["faulty"]
    assert p.values(f'router_backend_up{{instance="{main}"}}', by="backend") == {"small": 1, "large": 1}
    deadline = time.monotonic() + 15  # the dead backend's circuit opens after failed health checks
    while (up := p.values(f'router_backend_up{{instance="{faulty}"}}', by="backend")).get("dead") != 0:
        assert time.monotonic() < deadline, f"the dead backend still counts as up: {up}"
        time.sleep(0.5)
    assert up == {"small": 1, "large": 1, "dead": 0}


# --------------------------------------------------------------------------------------------------------------
# The learning row: a gateway that explores, holds a target and learns from its ratings


@pytest.fixture(scope="module")
def learning_live(tmp_path_factory: pytest.TempPathFactory, tiny_scorer_cfg: ScorerConfig,
                  tiny_extractor: FeatureExtractor) -> Iterator[Prometheus]:
    folder = tmp_path_factory.mktemp("prometheus-learning")
    with small_and_large(folder, tiny_extractor.info) as (probes, small_url, large_url):
        settings = Settings(
            scorer=tiny_scorer_cfg, server={"metrics_port": free_port()},
            policy={"threshold": 0.8, "explore": 0.2, "target": {"kind": "dear_share", "value": 0.5,
                                                                 "min_requests": 20, "refresh_s": 0.2}},
            backends=[backend("small", small_url, probes["small"]), backend("large", large_url, probes["large"])],
            learning={"enabled": True, "store": str(folder / "examples.sqlite3"), "registry": str(folder / "registry"),
                      "refit_every_labels": 10, "refit_interval_s": 0.3, "min_labels": 10, "guard_min_labels": 10},
        )
        with (gateway(settings) as (url, metrics_host),
              prometheus(folder, lambda own: scrape_config([metrics_host], metrics_host, own)) as prom):
            for round_ in range(ROUNDS):
                for i in range(60):  # explored at 0.2: P(none of 60 explored) = 0.8^60, about 1e-6
                    r = httpx.post(f"{url}/v1/chat/completions", timeout=30, json={
                        "model": "router", "messages": [{"role": "user", "content": f"{round_}: {i} + 2?"}]})
                    assert r.status_code == 200
                    rate(url, r.headers["x-router-request-id"], {"correct": i % 3 == 0})
                deadline = time.monotonic() + 20
                while "router_learning_guard{" not in httpx.get(f"http://{metrics_host}/metrics").text:
                    assert time.monotonic() < deadline, "the learner made no pass"
                    time.sleep(0.2)
                prom.wait_for_scrape_after(time.time())
            yield prom


@pytest.mark.parametrize("expr", LEARNING_EXPRS)
def test_every_learning_query_returns_data(learning_live: Prometheus, expr: str) -> None:
    result = learning_live.query(to_promql(expr))
    assert result, f"no data for {to_promql(expr)}"
    assert any(math.isfinite(float(r["value"][1])) for r in result), f"only NaN/Inf for {to_promql(expr)}: {result}"
