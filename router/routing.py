"""Deciding where a request goes: scorer features → one probability per backend → the policy."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from router.config import Settings
from router.errors import APIError
from router.metrics import Metrics
from router.policy import Decision, Option, Reason, choose_by_threshold, choose_by_utility, request_cost
from router.probe import ProbeSet, check_compatible, load_probe
from router.scorer.batcher import MicroBatcher, ScorerUnavailable
from router.scorer.features import FeatureExtractor, Message

log = logging.getLogger(__name__)

CHARS_PER_TOKEN = 4  # for ranking backends by cost before the prompt is tokenised


@dataclass(frozen=True)
class Engine:
    """The blocking, load-once parts: the scorer model and the probes checked against it."""

    extractor: FeatureExtractor
    probes: ProbeSet


def load_engine(settings: Settings) -> Engine:
    """Load the scorer and every backend's probe; raise ProbeError if a probe was made for another scorer."""
    extractor = FeatureExtractor(settings.scorer)
    names, probes = [], []
    for b in settings.backends:
        if b.probe is None:
            continue
        probe = load_probe(b.probe)
        check_compatible(probe, extractor.info, f"the probe of backend {b.name!r} ({b.probe})")
        names.append(b.name)
        probes.append(probe)
    return Engine(extractor, ProbeSet(names, probes))


@dataclass(frozen=True)
class Routed:
    decision: Decision
    probabilities: dict[str, float] = field(default_factory=dict)
    scorer_ms: float | None = None


class Router:
    def __init__(self, settings: Settings, probes: ProbeSet, batcher: MicroBatcher, metrics: Metrics) -> None:
        self.settings = settings
        self.policy = settings.policy
        self.probes = probes
        self.batcher = batcher
        self.metrics = metrics
        self.backends = {b.name: b for b in settings.backends}
        self._by_model = {b.model: b.name for b in settings.backends}

    def explicit_backend(self, model: str) -> str | None:
        """The backend a request's ``model`` names (by backend name or served model), None for the alias."""
        if model == self.policy.alias:
            return None
        if model in self.backends:
            return model
        if model in self._by_model:
            return self._by_model[model]
        known = ", ".join([self.policy.alias, *self.backends])
        raise APIError(404, f"The model {model!r} does not exist. Available: {known}", param="model",
                       code="model_not_found")

    def _options(self, probabilities: dict[str, float], prompt_tokens: int, output_tokens: int) -> list[Option]:
        return [
            Option(name, request_cost(self.backends[name].input_cost_per_mtok,
                                      self.backends[name].output_cost_per_mtok, prompt_tokens, output_tokens), p)
            for name, p in probabilities.items()
        ]

    def _candidates(self, available: set[str]) -> list[str]:
        """Probed backends that are up; all probed backends if none is (better to try than to refuse)."""
        return [n for n in self.probes.names if n in available] or list(self.probes.names)

    def unscored(self, available: set[str]) -> Decision:
        """Without a score: the configured fallback, else the dearest backend (the safest bet on accuracy)."""
        names = self._candidates(available)
        dearest = max(names, key=lambda n: (self.backends[n].output_cost_per_mtok,
                                             self.backends[n].input_cost_per_mtok))
        first = self.policy.fallback if self.policy.fallback in available else dearest
        return Decision(first, Reason.UNSCORED, (first, *[n for n in names if n != first]))

    async def decide(
        self, messages: Sequence[Message], *, available: set[str], threshold: float | None,
        output_tokens: int | None, prompt_chars: int,
    ) -> Routed:
        try:
            scored = await self.batcher.score(messages, timeout_s=self.settings.scorer.timeout_s)
        except ScorerUnavailable as e:
            log.warning("routing without a score: %s", e)
            self.metrics.scorer_errors.labels(e.kind).inc()
            return Routed(self.unscored(available))
        self.metrics.scorer_seconds.observe(scored.total_s)
        self.metrics.scorer_queue_seconds.observe(scored.queue_s)
        candidates = self._candidates(available)
        probabilities = {n: p for n, p in self.probes.predict(scored.features, messages).items() if n in candidates}
        options = self._options(
            probabilities, prompt_chars // CHARS_PER_TOKEN, output_tokens or self.policy.expected_output_tokens
        )
        if self.policy.mode == "utility":
            decision = choose_by_utility(options, self.policy.cost_weight)
        else:
            limit = self.policy.threshold if threshold is None else threshold
            decision = choose_by_threshold(options, limit, self.policy.fallback)
        return Routed(decision, probabilities, scored.total_s * 1000)
