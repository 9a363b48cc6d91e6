"""Learning in the gateway (``learning.enabled``): what a routed answer keeps for its rating, how a rating becomes
a labelled example, the learner run off the request path by one replica at a time, and promoted probe versions
picked up by every replica.

- **Kept with the answer.** When an answer is remembered for feedback, ``LiveLearning.observation`` adds what the
  answering backend's probe saw (``Observation``: the scorer's features as float16, the prompt text when a probe
  reads text features, every estimate, the probe versions, the policy's choice and the propensity of where the
  request went). It travels with the answer (``router.state``: in Redis with ``state.redis_url``), so a rating sent
  to any replica joins the features another replica kept. A request the cascade decided without the full pass
  (cache, text, early) keeps the scorer's view of the prompt instead; its features are computed when it is rated
  (one pass per rating, on the rater's share of the scorer, off the request path). A request answered by failover
  or by a named backend keeps nothing: no policy chose where it went, so its label would weigh wrongly.
- **Rated.** ``LiveLearning.rated`` joins a rating (right, wrong, or a score) with its observation and writes the
  labelled example to ``learning.store`` (SQLite, in a worker thread), if the key may teach the probes
  (``learning.raters``).
- **The learner.** Every replica runs the loop, but only the one holding the lock file beside the registry
  (``fcntl.flock``: released by the OS when its holder dies, so another replica takes over) refits: every
  ``learning.refit_interval_s`` it runs ``Learner.run_due`` in a worker thread. ``python -m router learn`` runs the
  same loop as its own process (then set ``learning.in_process: false``).
- **Promotions reach every replica.** Each replica polls the registry's ``CURRENT`` files every
  ``learning.reload_interval_s`` and serves a changed version at once (``Router.serve_probes``); a rollback
  (``python -m router probes rollback``) is picked up the same way.

The registry and the store are files: the replicas of one host share them through a volume (docker-compose.yml).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from router.config import Settings
from router.feedback import Answered
from router.learning.examples import Observation
from router.learning.learner import Learner, LearnerSettings, Outcome
from router.learning.store import ExampleStore
from router.learning.versions import Registry
from router.metrics import Metrics
from router.policy import Reason, Stage
from router.probe import Probe, ProbeError
from router.scorer.interface import ScorerUnavailable
from router.text_features import prompt_text

if TYPE_CHECKING:
    from router.request import Routable
    from router.routing import Routed, Router

log = logging.getLogger(__name__)

LOCK_FILE = ".learner.lock"
NOT_EXPLORED = (Reason.EXPLICIT, Reason.UNSCORED, Reason.FAILOVER)
_NO_FEATURES = np.zeros(0, dtype=np.float32)  # kept when the cascade decided without the full pass


def version_number(name: str) -> int:
    return int(name[1:]) if name.startswith("v") and name[1:].isdigit() else 0


class LearnerLock:
    """An exclusive, non-blocking lock on a file: one learner per registry, however many replicas or
    ``python -m router learn`` processes share it. The OS releases it when its holder dies."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> bool:
        if self._fd is not None:
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def open_learner(settings: Settings, registry: Registry, store: ExampleStore) -> Learner:
    """The learner of ``settings``' probed backends, each anchored to its configured probe (imported as v1)."""
    probed = [b for b in settings.backends if b.probe is not None]
    for b in probed:
        registry.ensure_base(b.name, b.probe)
    anchors = {b.name: registry.load(b.name, "v1") for b in probed}
    return Learner(store, registry, LearnerSettings.from_config(settings.learning), anchors)


def run_learner_pass(learner: Learner, metrics: Metrics | None = None) -> list[Outcome]:
    """One pass of the learner over the backends that are due (blocking: numpy and SQLite)."""
    outcomes = learner.run_due()
    for o in outcomes:
        if o.promoted:
            log.info("learner: %s now serves %s (%s)", o.backend, o.promoted, o.kind)
        if metrics is not None:
            metrics.child(metrics.learning_refits, o.backend, "promoted" if o.promoted else "kept").inc()
            verdict = o.verdicts.get(o.kind or "") or next((v for v in o.verdicts.values() if "serving" in v), {})
            figures = verdict.get("candidate" if o.promoted else "serving")
            for measure in ("auroc", "ece", "logloss"):
                if isinstance(figures, dict) and measure in figures:
                    metrics.guard_quality.labels(o.backend, measure).set(figures[measure])
    return outcomes


class LiveLearning:
    """The gateway's side of learning (see the module doc). ``start`` inside the running loop, ``aclose`` at the
    end; ``clock`` gives rating times (unix seconds)."""

    def __init__(self, settings: Settings, router: Router, metrics: Metrics,
                 clock: Callable[[], float] = time.time) -> None:
        cfg = settings.learning
        assert cfg.registry is not None and cfg.store is not None  # the config requires them when enabled
        self.settings = settings
        self.cfg = cfg
        self.router = router
        self.metrics = metrics
        self.clock = clock
        self.registry = Registry(cfg.registry)
        self.store_path = Path(cfg.store)
        self.store: ExampleStore | None = None
        self.served: dict[str, str] = {}  # backend → the version this replica serves
        self.lock = LearnerLock(Path(cfg.registry) / LOCK_FILE)
        self.learner: Learner | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._pending: set[asyncio.Task[None]] = set()
        self._probed = [b.name for b in settings.backends if b.probe is not None]
        self._text = any(g.probes.text is not None for g in router.groups)

    async def start(self) -> None:
        """Import the configured probes as v1 where the registry has none, serve the current versions, and start
        the reload and learner loops."""
        self.store_path.parent.mkdir(parents=True, exist_ok=True)
        self.store = await asyncio.to_thread(ExampleStore, self.store_path, self.cfg.max_examples)
        await asyncio.to_thread(self._ensure_bases)
        await self.reload()
        self._tasks.append(asyncio.create_task(self._every(self.cfg.reload_interval_s, self.reload), name="probes"))
        if self.cfg.in_process:
            self._tasks.append(asyncio.create_task(self._every(self.cfg.refit_interval_s, self.learn_once),
                                                   name="learner"))

    def _ensure_bases(self) -> None:
        for b in self.settings.backends:
            if b.probe is not None:
                self.registry.ensure_base(b.name, b.probe)

    async def _every(self, interval_s: float, work: Callable[[], Any]) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await work()
            except Exception:  # a loop that dies would stop learning silently: log and go on
                log.exception("learning: %s failed", getattr(work, "__name__", work))

    async def reload(self) -> list[str]:
        """Serve every backend's current version where it differs from the one served; the backends changed."""
        current = await asyncio.to_thread(self._current_names)
        changed = {b: name for b, name in current.items() if self.served.get(b) != name}
        if not changed:
            return []
        probes: dict[str, Probe] = {}
        for backend, name in changed.items():
            try:
                probes[backend] = await asyncio.to_thread(self.registry.load, backend, name)
            except (ProbeError, OSError, ValueError) as e:
                log.error("learning: cannot serve %s %s: %s (keeping %s)", backend, name, e, self.served.get(backend))
                continue
        try:
            served = self.router.serve_probes(probes)
        except ProbeError as e:
            log.error("learning: %s", e)
            return []
        for backend in served:
            log.info("learning: serving %s %s (was %s)", backend, changed[backend], self.served.get(backend))
            self.served[backend] = changed[backend]
            self.metrics.probe_version.labels(backend).set(version_number(changed[backend]))
        return served

    def _current_names(self) -> dict[str, str]:
        names = {}
        for backend in self._probed:
            with contextlib.suppress(FileNotFoundError):
                names[backend] = self.registry.current_name(backend)
        return names

    async def learn_once(self) -> list[Outcome]:
        """One learner pass if this process holds the learner's lock (else nothing); then serve what it promoted."""
        if not await asyncio.to_thread(self.lock.acquire):
            return []
        if self.learner is None:
            assert self.store is not None
            self.learner = await asyncio.to_thread(open_learner, self.settings, self.registry, self.store)
        outcomes = await asyncio.to_thread(run_learner_pass, self.learner, self.metrics)
        if any(o.promoted for o in outcomes):
            await self.reload()
        return outcomes

    def observation(self, request_id: str, request: Routable, routed: Routed, backend: str) -> str | None:
        """What ``backend``'s probe saw of the routed request it answered, as JSON to keep with the answer; None
        when the label would not be the policy's (a named backend, unscored, answered by failover)."""
        estimate = routed.estimate
        decision = routed.decision
        if estimate is None or decision.reason in NOT_EXPLORED or backend != decision.backend:
            return None
        group = next((g for g in self.router.groups if backend in g.probes.names), None)
        if group is None:
            return None
        index = self.router.groups.index(group)
        scored = estimate.scored[index] if index < len(estimate.scored) else None
        features = scored.features if scored is not None and estimate.stage is Stage.SCORER else None
        view = group.scorer.encoder.view(request.messages)
        meta: dict[str, Any] = {"reason": str(decision.reason), "threshold": request.threshold,
                                "stage": str(estimate.stage)}
        if features is None:
            meta["view"] = view  # scored when rated
        text = prompt_text(view) if self._text and self.cfg.keep_prompt_text else None
        served = {n: self.served.get(n, "v1") for n in estimate.probabilities}
        observation = Observation.make(
            id=request_id, at=self.clock(), key=request.client, backend=backend,
            chosen=routed.chosen or decision.backend, propensity=routed.propensity, estimates=estimate.probabilities,
            versions=served, fingerprint=group.scorer.info.fingerprint,
            features=features if features is not None else _NO_FEATURES, text=text, meta=meta)
        return observation.to_json()

    def rated(self, answered: Answered, score: float, client: str) -> None:
        """Turn a rating into a labelled example, in the background (the rating's response does not wait)."""
        task = asyncio.create_task(self._rated(answered, score, client))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _rated(self, answered: Answered, score: float, client: str) -> None:
        backend = answered.backend
        if answered.observation is None:
            self.metrics.child(self.metrics.learning_examples, backend, "no_observation").inc()
            return
        if self.cfg.raters is not None and client not in self.cfg.raters:
            self.metrics.child(self.metrics.learning_examples, backend, "not_rater").inc()
            return
        try:
            observation = Observation.from_json(answered.observation)
            if not observation.features:
                observation = await self._with_features(observation)
            example = observation.rated(score, rated_at=self.clock())
            assert self.store is not None
            await asyncio.to_thread(self.store.add, [example])
        except (ScorerUnavailable, ValueError, KeyError) as e:
            log.warning("learning: the rating of %s is not kept: %s", answered.observation[:40], e)
            self.metrics.child(self.metrics.learning_examples, backend, "error").inc()
            return
        self.metrics.child(self.metrics.learning_examples, backend, "stored").inc()

    async def _with_features(self, observation: Observation) -> Observation:
        """``observation`` with the features of the prompt view it kept (the cascade decided it without them)."""
        view: Sequence[Mapping[str, str]] = observation.meta["view"]
        group = next(g for g in self.router.groups if observation.backend in g.probes.names)
        if group.scorer.info.fingerprint != observation.fingerprint:
            raise ValueError("the scorer changed since the answer was given")
        scored = await group.scorer.score(list(view), self.settings.scorer.timeout_s, key=observation.key)
        assert scored.features is not None
        meta = {k: v for k, v in observation.meta.items() if k != "view"}
        return Observation.make(
            id=observation.id, at=observation.at, key=observation.key, backend=observation.backend,
            chosen=observation.chosen, propensity=observation.propensity, estimates=observation.estimates,
            versions=observation.versions, fingerprint=observation.fingerprint, features=scored.features,
            text=observation.text, meta=meta)

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        self.lock.release()
        if self.store is not None:
            self.store.close()


