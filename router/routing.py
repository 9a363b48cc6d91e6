"""Deciding where a request goes: scorer features → one probability per backend → the policy.

``Router.route`` is the one entry point: a request naming a backend goes there, a routed one is scored by every
scorer its candidates' probes read (usually one shared scorer; a backend with a self-probe names its own) and
the policy picks among the backends that are up. A routed request of a session pinned to a backend then stays
there unless its pin breaks (``router.affinity``): the pin is looked up while the request is scored.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from router.affinity import Affinity, apply_affinity
from router.config import Settings
from router.errors import NotFound, PermissionDenied
from router.learning.exploration import explore
from router.learning.target import ThresholdController, make_entry
from router.metrics import Metrics
from router.policy import (
    Decision,
    Option,
    Reason,
    Rule,
    Stage,
    choose_by_threshold,
    choose_by_utility,
    clear_decision,
    request_cost,
)
from router.probe import Probe, ProbeSet, check_compatible, check_early_compatible, load_probe
from router.request import Routable
from router.score_cache import ScoreCache
from router.scorer import open_scorer
from router.scorer.interface import EarlyExit, Scored, Scorer, ScorerUnavailable
from router.scorer.recipe import Message

if TYPE_CHECKING:
    from router.learning.shared_target import SharedTarget
    from router.session_state import AffinityStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbeGroup:
    """One scorer and the probes that read its features (checked against its recipe at load). ``early_exit``: the
    probes' early stage reads a block where this scorer can stop its pass (checked against its fingerprint)."""

    scorer: Scorer
    probes: ProbeSet
    early_exit: bool = False


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
    groups = []
    for scorer, names, probes in by_scorer.values():
        probe_set = ProbeSet(names, probes)
        groups.append(ProbeGroup(scorer, probe_set, _early_exit(settings, scorer, probe_set, probes, names)))
    return tuple(groups)


def _early_exit(settings: Settings, scorer: Scorer, probe_set: ProbeSet, probes: Sequence[Probe],
                names: Sequence[str]) -> bool:
    """Whether stage 2 of the cascade can run for these probes on this scorer: their early stages read the block
    the config names, and the scorer can stop its pass there with the features they were trained on (ProbeError
    if it could stop there but they were trained on other features)."""
    cascade = settings.policy.cascade
    layer = probe_set.early_layer
    if not cascade.enabled or layer is None or layer != cascade.early_layer:
        return False
    info = scorer.early_exit_info(layer)
    if info is None:
        log.info("cascade: no early stage for %s (this scorer cannot stop its pass at block %d)", ", ".join(names),
                 layer)
        return False
    for name, probe in zip(names, probes, strict=True):
        check_early_compatible(probe, info, f"the probe of backend {name!r}")
    return True


@dataclass(frozen=True)
class Estimate:
    """Each candidate's estimated chance of success for one request, and what it was estimated from."""

    probabilities: dict[str, float]
    prompt_tokens: int  # as the scorer's tokenizer counts them
    scorer_ms: float
    scored: tuple[Scored, ...]  # per probe group: the features its probes read (none when no pass ran)
    stage: Stage = Stage.SCORER  # which estimates decided (the cascade's cheapest clear stage)


@dataclass(frozen=True)
class Routed:
    decision: Decision
    probabilities: dict[str, float] = field(default_factory=dict)
    scorer_ms: float | None = None
    estimate: Estimate | None = None  # None: not scored (a named backend, an unreadable prompt, the scorer down)
    affinity: Affinity | None = None  # what affinity did, for a routed request of a session; None: no session
    chosen: str | None = None  # the policy's choice, where exploration (policy.explore) sent it elsewhere or not
    propensity: float = 1.0  # the probability that the request went to decision.backend, given its estimates


class Router:
    """Decides where requests go. A routed request's estimates come from the cheapest stage whose decision is clear
    (the cascade, with ``policy.cascade`` and probe files that carry the stages): the same prompt's estimates made
    before (``cache``), the text-only models, the models at an early block of the scorer's pass (the pass stops
    there), else the full probes. With several scorers (self-probes) every request runs the full passes. A
    conversation's later turn then stays on its session's backend while the pin holds (``router.affinity``)."""

    def __init__(self, settings: Settings, groups: Sequence[ProbeGroup], metrics: Metrics,
                 cache: ScoreCache | None = None, affinity: AffinityStore | None = None, *,
                 target: ThresholdController | SharedTarget | None = None, rng: random.Random | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        """``cache``: the score cache (stage 0), None: off. ``affinity``: where sessions' pins are kept
        (``router.session_state``); None: affinity off. ``target``: the controller holding policy.target, fed each
        routed decision. ``rng``: draws exploration (policy.explore)."""
        self.settings = settings
        self.target = target
        self.rng = rng or random.Random()
        self.clock = clock
        cheapest = min((b.price_rank() for b in settings.backends), default=0.0)
        self._dearer = {b.name for b in settings.backends if b.price_rank() > cheapest}
        self.affinity = affinity
        self.policy = settings.policy
        self.groups = tuple(groups)
        self.metrics = metrics
        self.cache = cache if cache is not None and cache.enabled and len(self.groups) == 1 else None
        self.backends = {b.name: b for b in settings.backends}
        self.probed = [name for g in self.groups for name in g.probes.names]
        self._by_model = {b.model: b.name for b in settings.backends}
        self._cascade = settings.policy.cascade.enabled and len(self.groups) == 1 and bool(self.groups[0].probes.stages)

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
        pinned = self._pinned(request)  # looked up while the request is scored
        if not request.messages:
            return await self._keep(Routed(self._unscored(candidates, available, request)), request, pinned,
                                    available)
        try:
            estimate = await self._estimate(request, candidates)
        except ScorerUnavailable as e:
            log.warning("routing without a score: %s", e)
            self.metrics.scorer_errors.labels(e.kind).inc()
            return await self._keep(Routed(self._unscored(candidates, available, request)), request, pinned,
                                    available)
        routed = self._explore(self._decide(estimate, request), estimate, candidates, request)
        return await self._keep(routed, request, pinned, available)

    def _explore(self, decision: Decision, estimate: Estimate, candidates: list[str], request: Routable) -> Routed:
        """The policy's decision, or with probability policy.explore another candidate (router.learning.explore),
        with the probability of where it went; the target's controller sees where it went."""
        routed = Routed(decision, estimate.probabilities, estimate.scorer_ms, estimate, chosen=decision.backend)
        if self.policy.explore > 0:
            explored = explore(decision, candidates, self.policy.explore, self.rng)
            routed = replace(routed, decision=explored.decision, propensity=explored.propensity)
            if explored.explored:
                self.metrics.child(self.metrics.explored, explored.decision.backend).inc()
        if self.target is not None:
            options = self._options(estimate.probabilities, estimate.prompt_tokens, request.output_tokens)
            self.target.observe(make_entry(self.target.kind, options, fallback=self.policy.fallback,
                                           dearer=self._dearer, sent_to=routed.decision.backend, at=self.clock()))
        return routed

    def serve_probes(self, probes: Mapping[str, Probe]) -> list[str]:
        """Serve ``probes`` (backend → probe, e.g. a version promoted by the learner) in place of those served
        now; the backends whose probe changed. A learned probe (``training.learning``) is served without its
        cascade stages: their margins were chosen against the probe it replaces (re-choose them with
        ``python -m probes calibrate`` and promote the result)."""
        changed = []
        groups = list(self.groups)
        for i, group in enumerate(groups):
            names = group.probes.names
            if not any(n in probes for n in names):
                continue
            current = dict(zip(names, group.probes.probes, strict=True))
            for name in names:
                if name in probes:
                    probe = probes[name]
                    check_compatible(probe, group.scorer.info, f"the served probe of backend {name!r}")
                    if probe.training.get("learning"):
                        probe = replace(probe, stages={}, cascade={})
                    current[name] = probe
                    changed.append(name)
            probe_set = ProbeSet(names, [current[n] for n in names])
            groups[i] = replace(group, probes=probe_set, early_exit=group.early_exit and "early" in probe_set.stages)
        self.groups = tuple(groups)
        self._cascade = (self.settings.policy.cascade.enabled and len(self.groups) == 1
                         and bool(self.groups[0].probes.stages))
        return changed

    def _pinned(self, request: Routable) -> Awaitable[str | None] | None:
        """The lookup of the backend the request's session is pinned to, under way (None: nothing to look up)."""
        session = request.session
        if self.affinity is None or session is None or not session.lookup:
            return None
        return asyncio.ensure_future(self.affinity.get(session.key))

    async def _keep(self, routed: Routed, request: Routable, pinned: Awaitable[str | None] | None,
                    available: set[str]) -> Routed:
        """``routed``, or the session's pinned backend instead while its pin holds (``router.affinity``)."""
        if self.affinity is None or request.session is None:
            return routed
        kept = apply_affinity(routed.decision, await pinned if pinned is not None else None,
                              estimates=routed.probabilities, threshold=request.threshold,
                              break_margin=self.settings.affinity.break_margin, configured=self.backends,
                              available=available, allowed=request.backends)
        self.metrics.child(self.metrics.affinity, kept.verdict).inc()
        return replace(routed, decision=kept.decision, affinity=kept)

    async def _estimate(self, request: Routable, candidates: list[str]) -> Estimate:
        """Every candidate's estimate for ``request``, from the cheapest stage that decides it."""
        if self.cache is None and not self._cascade:
            return await self._full(request, candidates)
        group = self.groups[0]
        started = time.perf_counter()
        view = group.scorer.encoder.view(request.messages)  # what the scorer reads, and so the text models
        ids = await group.scorer.encoder.encode_async(request.messages) if self.cache is not None else None
        prompt_tokens = len(ids) if ids is not None else request.prompt_tokens
        if self.cache is not None and ids is not None:
            cached = await self.cache.get(request.client, group.probes.version, ids)
            if cached is not None and set(candidates) <= set(cached):
                return self._stage_estimate(Stage.CACHE, cached, candidates, prompt_tokens, started)
        row = group.probes.text_row(view)
        margins = self._margins(group, request) if self._cascade else {}
        if "text" in margins:
            text = group.probes.predict_text(row=row)
            if self._clear(text, candidates, prompt_tokens, request, margins["text"]):
                return self._stage_estimate(Stage.TEXT, text, candidates, prompt_tokens, started)
        early = None
        if group.early_exit and "early" in margins and group.probes.early_layer is not None:
            def should_stop(x: np.ndarray) -> bool:  # in the scorer's worker thread: microseconds of numpy
                return self._clear(group.probes.predict_early(x, row=row), candidates, prompt_tokens, request,
                                   margins["early"])

            early = EarlyExit(group.probes.early_layer, should_stop)
        scored = await self._pass(group.scorer, request, early, ids)
        stage = Stage.EARLY if scored.stopped else Stage.SCORER
        if scored.stopped:
            assert scored.early is not None
            estimates = group.probes.predict_early(scored.early, row=row)
        else:
            assert scored.features is not None
            estimates = group.probes.predict(scored.features, row=row)
        if self.cache is not None and ids is not None:
            await self.cache.put(request.client, group.probes.version, ids, estimates)
        return self._stage_estimate(stage, estimates, candidates, scored.prompt_tokens, started, (scored,))

    async def _full(self, request: Routable, candidates: list[str]) -> Estimate:
        """Every candidate's estimate from the full probes of every scorer (no cascade, no cache)."""
        scores = await self._score(request.messages, request.client)
        probabilities = {}
        for group, scored in zip(self.groups, scores, strict=True):
            assert scored.features is not None
            predicted = group.probes.predict(scored.features, group.scorer.encoder.view(request.messages))
            probabilities.update({n: p for n, p in predicted.items() if n in candidates})
        self.metrics.child(self.metrics.decision_stage, Stage.SCORER).inc()
        return Estimate(probabilities, scores[0].prompt_tokens, max(s.total_s for s in scores) * 1000, tuple(scores))

    def _stage_estimate(self, stage: Stage, estimates: dict[str, float], candidates: list[str], prompt_tokens: int,
                        started: float, scored: tuple[Scored, ...] = ()) -> Estimate:
        self.metrics.child(self.metrics.decision_stage, stage).inc()
        probabilities = {n: p for n, p in estimates.items() if n in candidates}
        return Estimate(probabilities, prompt_tokens, (time.perf_counter() - started) * 1000, scored, stage)

    def _margins(self, group: ProbeGroup, request: Routable) -> dict[str, float]:
        """Each stage's margin: the config's override, else what the probe files carry for this threshold."""
        cascade = self.policy.cascade
        margins = group.probes.margins(request.threshold if self.policy.mode == "threshold" else None)
        for stage, override in (("text", cascade.text_margin), ("early", cascade.early_margin)):
            if override is not None and stage in group.probes.stages:
                margins[stage] = override
        return margins

    def _clear(self, estimates: dict[str, float], candidates: list[str], prompt_tokens: int, request: Routable,
               margin: float) -> bool:
        """Whether ``estimates`` give a decision no estimate within ``margin`` of them would change."""
        options = self._options({n: estimates[n] for n in candidates}, prompt_tokens, request.output_tokens)
        rule = Rule(self.policy.mode, request.threshold, self.policy.cost_weight, self.policy.fallback,
                    self.policy.margin)
        return clear_decision(options, rule, margin) is not None

    async def _pass(self, scorer: Scorer, request: Routable, early: EarlyExit | None,
                    ids: list[int] | None) -> Scored:
        scored = await scorer.score(request.messages, self.settings.scorer.timeout_s, key=request.client,
                                    early=early, ids=ids)
        self._observe(scored)
        return scored

    def _decide(self, estimate: Estimate, request: Routable) -> Decision:
        """The policy's choice among the estimated candidates, at the request's threshold."""
        options = self._options(estimate.probabilities, estimate.prompt_tokens, request.output_tokens)
        if self.policy.mode == "utility":
            return choose_by_utility(options, self.policy.cost_weight, self.policy.fallback, self.policy.margin)
        return choose_by_threshold(options, request.threshold, self.policy.fallback)

    async def _score(self, messages: Sequence[Message], client: str) -> list[Scored]:
        """Every group's scorer's features for ``messages``, scored as ``client``'s (each scorer shares itself
        among keys by tokens: router/scorer/fair.py)."""
        timeout = self.settings.scorer.timeout_s
        if len(self.groups) == 1:
            scores = [await self.groups[0].scorer.score(messages, timeout, key=client)]
        else:
            results = await asyncio.gather(*(g.scorer.score(messages, timeout, key=client) for g in self.groups),
                                           return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    raise result
            scores = list(results)  # type: ignore[arg-type]
        for scored in scores:
            self._observe(scored)
        return scores

    def _observe(self, scored: Scored) -> None:
        self.metrics.scorer_seconds.observe(scored.total_s)
        self.metrics.scorer_queue_seconds.observe(scored.queue_s)

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
