"""Prometheus metrics, one registry per app (no global state).

Every label has bounded cardinality: backend names come from the config, statuses are HTTP codes, reasons and
kinds are fixed vocabularies. Handy queries (also in the Grafana dashboard):

- savings: ``1 - sum(router_cost_usd_total) / sum(router_reference_cost_usd_total)``
- expected accuracy: ``sum(router_predicted_success_sum) / sum(router_predicted_success_count)``
- realised accuracy: ``sum(router_feedback_score_total) / sum(router_feedback_total)``
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from router.scorer.interface import BatchStats

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_SCORER = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5)
_PROB = tuple(i / 20 for i in range(1, 21))

M = TypeVar("M", Counter, Histogram)


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    _children: dict[tuple[int, tuple[str, ...]], Any] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter(
            "router_requests", "Requests answered, by backend, HTTP status and route reason",
            ["backend", "status", "reason"], registry=r,
        )
        self.prompt_tokens = Counter(
            "router_prompt_tokens", "Prompt tokens reported by the backend", ["backend"], registry=r
        )
        self.completion_tokens = Counter(
            "router_completion_tokens", "Completion tokens reported by the backend", ["backend"], registry=r
        )
        self.cost = Counter("router_cost_usd", "Cost in USD at the configured prices", ["backend"], registry=r)
        self.reference_cost = Counter(
            "router_reference_cost_usd",
            "What the reference policy (always the dearest backend) would have paid for the same tokens, "
            "by the backend that actually served them", ["backend"], registry=r,
        )
        self.predicted_success = Histogram(
            "router_predicted_success", "Estimated success probability of the chosen backend",
            ["backend"], buckets=_PROB, registry=r,
        )
        self.feedback = Counter("router_feedback", "Answers rated through /v1/feedback", ["backend"], registry=r)
        self.feedback_score = Counter(
            "router_feedback_score", "Sum of feedback scores (1 = right, 0 = wrong)", ["backend"], registry=r
        )
        self.scorer_seconds = Histogram(
            "router_scorer_seconds", "Time from asking for a score to having it", buckets=_SCORER, registry=r
        )
        self.scorer_queue_seconds = Histogram(
            "router_scorer_queue_seconds", "Time a request waited for its scorer batch", buckets=_SCORER,
            registry=r,
        )
        self.scorer_batch_size = Histogram(
            "router_scorer_batch_size", "Prompts per scorer forward pass", buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.scorer_up = Gauge(
            "router_scorer_up", "1 while every scorer would score a request sent now (a remote scorer's circuit is "
            "closed), else 0: requests then go unscored to the fallback", registry=r,
        )
        self.decision_stage = Counter(
            "router_decision_stage", "Scored requests by the cascade stage that decided them: cache (the same "
            "prompt's estimates made before), text (the text-only models, no scorer pass), early (the pass stopped "
            "at an early block), scorer (the full pass)", ["stage"], registry=r,
        )
        self.scorer_batch_tokens = Histogram(
            "router_scorer_batch_tokens", "Prompt tokens per scorer forward pass (the local scorer)",
            buckets=(64, 128, 256, 512, 1024, 2048, 4096, 8192), registry=r,
        )
        self.scorer_early_stops = Counter(
            "router_scorer_early_stops", "Prompts whose scorer pass stopped at the cascade's early block", registry=r,
        )
        self.scorer_chunks = Counter(
            "router_scorer_chunks", "Parts of long prompts the local scorer ran in chunks (scorer.chunk_tokens), one "
            "pass each; a prompt's last chunk gives its features", registry=r,
        )
        self.scorer_errors = Counter(
            "router_scorer_errors", "Requests the scorer could not score, by kind", ["kind"], registry=r
        )
        self.upstream_seconds = Histogram(
            "router_upstream_seconds", "Time from forwarding to the backend's last byte", ["backend"],
            buckets=_LATENCY, registry=r,
        )
        self.ttft_seconds = Histogram(
            "router_time_to_first_token_seconds",
            "Streams: time from forwarding to the backend's first chunk", ["backend"], buckets=_LATENCY, registry=r,
        )
        self.upstream_errors = Counter(
            "router_upstream_errors", "Failed attempts to reach a backend, by kind", ["backend", "kind"], registry=r
        )
        self.in_flight = Gauge("router_requests_in_flight", "Requests being answered now", registry=r)
        self.affinity = Counter(
            "router_affinity", "Routed requests of a session, by what affinity did (router.affinity.Verdict): kept "
            "(a hit), new (no pin yet), or broken: estimate, unavailable, not_allowed, unknown", ["outcome"],
            registry=r,
        )
        self.route_only = Counter(
            "router_route_only", "Decisions given by POST /v1/route without forwarding anything, by the backend "
            "chosen and the reason (not counted in router_requests_total)", ["backend", "reason"], registry=r,
        )
        self.conversations = Counter(
            "router_responses_conversations", "Responses conversations (previous_response_id): saved, too_large "
            "(not kept), expanded (a follow-up continued), not_found (a follow-up named none kept)", ["outcome"],
            registry=r,
        )
        # Learning from traffic (router.learning; policy.explore, policy.target, learning:)
        self.explored = Counter(
            "router_explored", "Routed requests sent to a backend the policy did not choose (policy.explore), by the "
            "backend they went to", ["backend"], registry=r,
        )
        self.explore_cost = Counter(
            "router_explore_cost_usd", "Explored requests' cost as sent (as=\"sent\") and what the policy's choice "
            "would have cost for the same tokens (as=\"chosen\"): exploration's extra cost is their difference",
            ["as"], registry=r,
        )
        self.threshold = Gauge(
            "router_policy_threshold", "The threshold a routed request gets when it sets none: policy.threshold, or "
            "the one policy.target holds", registry=r,
        )
        self.target_realised = Gauge(
            "router_policy_target_realised", "policy.target's measure over the controller's window, as realised",
            registry=r,
        )
        self.learning_examples = Counter(
            "router_learning_examples", "Ratings joined with what the probe saw and stored as labelled examples, by "
            "backend and outcome: stored, no_observation (remembered without one: learning off, a failover, a "
            "named backend), not_rater (the key may not teach the probes), error", ["backend", "outcome"],
            registry=r,
        )
        self.learning_refits = Counter(
            "router_learning_refits", "Learner passes per backend, by result: promoted, kept (the serving probe won "
            "or too few labels)", ["backend", "result"], registry=r,
        )
        self.guard_quality = Gauge(
            "router_learning_guard", "The served probe's figures on its backend's guard ratings (labels no candidate "
            "is fitted on) at the learner's last pass: auroc, ece, logloss (in the learner's process)",
            ["backend", "measure"], registry=r,
        )
        self.probe_version = Gauge(
            "router_probe_version", "The version of each backend's probe this replica serves (learning.registry): "
            "its number", ["backend"], registry=r,
        )

    def observe_batch(self, stats: BatchStats) -> None:
        """One forward pass of a local scorer (called from its worker thread: prometheus-client is thread-safe)."""
        self.scorer_batch_size.observe(stats.size)
        if stats.tokens:
            self.scorer_batch_tokens.observe(stats.tokens)
        if stats.stopped:
            self.scorer_early_stops.inc(stats.stopped)
        if stats.chunks:
            self.scorer_chunks.inc(stats.chunks)

    def child(self, metric: M, *labels: str) -> M:
        """``metric.labels(*labels)``, looked up once. prometheus-client's ``labels()`` validates and locks on
        every call, microseconds on the hot path; label values are bounded (see above), so is this cache. A
        series still appears only once it is first used."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found


class CacheCounts(Collector):
    """``router_score_cache_total{result}``: lookups of the score cache that hit this replica's memory, hit Redis
    (another replica's estimate), or missed; read from the cache when scraped."""

    def __init__(self, counts: Callable[[], Mapping[str, int]]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[CounterMetricFamily]:
        total = CounterMetricFamily("router_score_cache", "Score-cache lookups by result (hit: this replica's "
                                    "memory, shared_hit: Redis, miss)", labels=["result"])
        for result, count in self._counts().items():
            total.add_metric([result], float(count))
        yield total


class BackendStates(Collector):
    """``router_backend_up{backend}``: 1 while a backend is a routing candidate, 0 while its circuit is open;
    read from the breakers when scraped."""

    def __init__(self, states: Callable[[], Mapping[str, str]]) -> None:
        self._states = states

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily("router_backend_up", "1 while a backend is a routing candidate, 0 while its "
                               "circuit is open", labels=["backend"])
        for name, state in self._states().items():
            up.add_metric([name], 0.0 if state == "open" else 1.0)
        yield up
