"""Prometheus metrics, one registry per app (no global state). Labels are backend names, statuses and reasons."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_SCORER = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5)
_PROB = tuple(i / 20 for i in range(1, 21))


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

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
        self.predicted_success = Histogram(
            "router_predicted_success", "Estimated success probability of the chosen backend",
            ["backend"], buckets=_PROB, registry=r,
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
        self.scorer_errors = Counter("router_scorer_errors", "Requests the scorer could not score", registry=r)
        self.upstream_seconds = Histogram(
            "router_upstream_seconds", "Time from forwarding to the backend's last byte", ["backend"],
            buckets=_LATENCY, registry=r,
        )
        self.ttft_seconds = Histogram(
            "router_upstream_first_byte_seconds", "Time from forwarding to the backend's first byte",
            ["backend"], buckets=_LATENCY, registry=r,
        )
        self.upstream_errors = Counter(
            "router_upstream_errors", "Failed attempts to reach a backend, by kind", ["backend", "kind"], registry=r
        )
        self.in_flight = Gauge("router_requests_in_flight", "Requests being answered now", registry=r)
