"""Deciding where a request goes: scorer features → one probability per backend → the policy.

``Router.route`` is the one entry point: a request naming a backend goes there, a routed one is scored by every
scorer its candidates' probes read (usually one shared scorer; a backend with a self-probe names its own) and
the policy picks among the backends that are up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from router.config import Settings
from router.errors import NotFound, PermissionDenied
from router.metrics import Metrics
from router.policy import Decision, Option, Reason, choose_by_threshold, choose_by_utility, request_cost
from router.probe import Probe, ProbeSet, check_compatible, load_probe
from router.request import Routable
from router.scorer import open_scorer
from router.scorer.interface import Scored, Scorer, ScorerUnavailable
from router.scorer.recipe import Message

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbeGroup:
    """One scorer and the probes that read its features (checked against its recipe at load)."""

    scorer: Scorer
    probes: ProbeSet


def load_probe_groups(settings: Settings) -> tuple[ProbeGroup, ...]:
    """Open each scorer the probed backends read (a local model loads now) and load their probes; raise
    ProbeError if a probe was made for another scorer."""
    by_scorer: dict[str, tuple[Scorer, list[str], list[Probe]]] = {}
    for b in settings.backends:
        if b.probe is None:
            continue
        cfg = settings.scorer_for(b)
        key = cfg.model_dump_json()
        if key not in by_scorer:
            by_scorer[key] = (open_scorer(cfg), [], [])
        scorer, names, probes = by_scorer[key]
        probe = load_probe(b.probe)
        check_compatible(probe, scorer.info, f"the probe of backend {b.name!r} ({b.probe})")
        names.append(b.name)
        probes.append(probe)
    return tuple(ProbeGroup(scorer, ProbeSet(names, probes)) for scorer, names, probes in by_scorer.values())


class ScorerShares:
    """Each key's share of the scorers: at most ``per_key`` of its requests being scored at once. A key that sends
    many (or huge) prompts at once queues behind its own, and the others' requests behind at most ``per_key`` of
    them. Keys are the configured ones (one for all anonymous requests), so the table stays small."""

    def __init__(self, per_key: int) -> None:
        self.per_key = per_key
        self._turns: dict[str, asyncio.Semaphore] = {}

    @contextlib.asynccontextmanager
    async def turn(self, client: str, timeout_s: float) -> AsyncIterator[None]:
        slots = self._turns.setdefault(client, asyncio.Semaphore(self.per_key))
        try:
            async with asyncio.timeout(timeout_s):
                await slots.acquire()
        except TimeoutError as e:
            raise ScorerUnavailable("key_share", f"this key already has {self.per_key} requests being scored; "
                                    f"none finished within {timeout_s:g}s") from e
        try:
            yield
        finally:
            slots.release()


@dataclass(frozen=True)
class Estimate:
    """Each candidate's estimated chance of success for one request, and what it was estimated from."""

    probabilities: dict[str, float]
    prompt_tokens: int  # as the scorer's tokenizer counts them
    scorer_ms: float
    scored: tuple[Scored, ...]  # per probe group: the features its probes read


@dataclass(frozen=True)
class Routed:
    decision: Decision
    probabilities: dict[str, float] = field(default_factory=dict)
    scorer_ms: float | None = None
    estimate: Estimate | None = None  # None: not scored (a named backend, an unreadable prompt, the scorer down)


class Router:
    def __init__(self, settings: Settings, groups: Sequence[ProbeGroup], metrics: Metrics) -> None:
        self.settings = settings
        self.policy = settings.policy
        self.groups = tuple(groups)
        self.metrics = metrics
        self.backends = {b.name: b for b in settings.backends}
        self.probed = [name for g in self.groups for name in g.probes.names]
        self._shares = ScorerShares(settings.scorer.max_in_flight_per_key)
        self._by_model = {b.model: b.name for b in settings.backends}

    async def route(self, request: Routable, *, available: set[str]) -> Routed:
        """Where ``request`` goes, given the backends whose circuit lets requests through now. NotFound for a
        model that names nothing; PermissionDenied for a backend the request's key may not use."""
        explicit = self._explicit_backend(request.model)
        if explicit is not None:
            if not request.allows(explicit):
                raise PermissionDenied(f"key {request.client!r} may not use backend {explicit!r}", param="model",
                                       code="model_not_allowed")
            return Routed(Decision(explicit, Reason.EXPLICIT, (explicit,)))
        candidates = self._candidates(available, request)
        if not request.messages:
            return Routed(self._unscored(candidates, available, request))
        try:
            estimate = await self._estimate(request, candidates)
        except ScorerUnavailable as e:
            log.warning("routing without a score: %s", e)
            self.metrics.scorer_errors.labels(e.kind).inc()
            return Routed(self._unscored(candidates, available, request))
        return Routed(self._decide(estimate, request), estimate.probabilities, estimate.scorer_ms, estimate)

    async def _estimate(self, request: Routable, candidates: list[str]) -> Estimate:
        """Every candidate's estimate for ``request``: its scorers' features through their probes."""
        scores = await self._score(request.messages, request.client)
        probabilities = {}
        for group, scored in zip(self.groups, scores, strict=True):
            predicted = group.probes.predict(scored.features, request.messages)
            probabilities.update({n: p for n, p in predicted.items() if n in candidates})
        return Estimate(probabilities, scores[0].prompt_tokens, max(s.total_s for s in scores) * 1000, tuple(scores))

    def _decide(self, estimate: Estimate, request: Routable) -> Decision:
        """The policy's choice among the estimated candidates, at the request's threshold."""
        options = self._options(estimate.probabilities, estimate.prompt_tokens, request.output_tokens)
        if self.policy.mode == "utility":
            return choose_by_utility(options, self.policy.cost_weight, self.policy.fallback, self.policy.margin)
        return choose_by_threshold(options, request.threshold, self.policy.fallback)

    async def _score(self, messages: Sequence[Message], client: str) -> list[Scored]:
        timeout = self.settings.scorer.timeout_s
        started = time.monotonic()
        async with self._shares.turn(client, timeout):
            timeout = max(timeout - (time.monotonic() - started), 0.001)
            if len(self.groups) == 1:
                scores = [await self.groups[0].scorer.score(messages, timeout)]
            else:
                results = await asyncio.gather(*(g.scorer.score(messages, timeout) for g in self.groups),
                                               return_exceptions=True)
                for result in results:
                    if isinstance(result, BaseException):
                        raise result
                scores = list(results)  # type: ignore[arg-type]
        for scored in scores:
            self.metrics.scorer_seconds.observe(scored.total_s)
            self.metrics.scorer_queue_seconds.observe(scored.queue_s)
        return scores

    def _explicit_backend(self, model: str) -> str | None:
        """The backend a request's ``model`` names (by backend name or served model), None for the alias."""
        if model == self.policy.alias:
            return None
        if model in self.backends:
            return model
        if model in self._by_model:
            return self._by_model[model]
        known = ", ".join([self.policy.alias, *self.backends])
        raise NotFound(f"The model {model!r} does not exist. Available: {known}", param="model",
                       code="model_not_found")

    def _options(self, probabilities: dict[str, float], prompt_tokens: int, output_tokens: int) -> list[Option]:
        return [
            Option(name, request_cost(self.backends[name].input_cost_per_mtok,
                                      self.backends[name].output_cost_per_mtok, prompt_tokens, output_tokens), p)
            for name, p in probabilities.items()
        ]

    def _candidates(self, available: set[str], request: Routable) -> list[str]:
        """The probed backends the request's key may use, those that are up; all of them if none is up (better to
        try than to refuse). PermissionDenied if the key may use none."""
        allowed = [n for n in self.probed if request.allows(n)]
        if not allowed:
            raise PermissionDenied(f"key {request.client!r} may use none of the routed backends; name one of its "
                                   "backends as the model", param="model", code="model_not_allowed")
        return [n for n in allowed if n in available] or allowed

    def _unscored(self, candidates: list[str], available: set[str], request: Routable) -> Decision:
        """Without a score: the configured fallback (if it is up and the key may use it), else the dearest."""
        dearest = max(candidates, key=lambda n: self.backends[n].price_rank())
        fallback = self.policy.fallback
        first = fallback if fallback is not None and fallback in available and request.allows(fallback) else dearest
        return Decision(first, Reason.UNSCORED, (first, *[n for n in candidates if n != first]))
