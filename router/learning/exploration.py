"""Exploration: a small, bounded share of routed requests goes to a backend the policy did not choose, so that
every backend keeps receiving labels on the kind of request the policy would send elsewhere.

Pure: the decision, the backends the request may use, the share ε and a random number generator in; the backend
to send to and the probability of that choice (its propensity) out. With ε > 0 and k other allowed backends,
the policy's choice keeps a request with probability 1 − ε and each other backend gets it with ε / k; the learner
weighs a label by 1 / propensity (inverse propensity), so labels from rarely-taken routes count for the many
requests like them that went elsewhere.
"""

from __future__ import annotations

import random
from collections.abc import Collection
from dataclasses import dataclass

from router.policy import Decision, Reason

MAX_EXPLORE = 0.2  # the most ``policy.explore`` may be (config.py enforces it)


@dataclass(frozen=True)
class Explored:
    decision: Decision  # where to send it: the policy's decision, or one whose first backend was explored
    propensity: float  # probability that this request goes to ``decision.backend`` (the first attempt)
    chosen: str  # the policy's own choice (so the extra cost of exploring can be counted)

    @property
    def explored(self) -> bool:
        return self.decision.backend != self.chosen


def explore(decision: Decision, allowed: Collection[str], share: float, rng: random.Random) -> Explored:
    """With probability ``share``, send the request to one of the other ``allowed`` backends instead (uniformly),
    never to one outside ``allowed`` (what the key may use and what is up). Decisions that are not the policy's
    own (a named backend, an unscored request) are never explored. The failover order after an explored backend
    is the policy's order."""
    if not 0.0 <= share <= MAX_EXPLORE:
        raise ValueError(f"the exploration share must be in [0, {MAX_EXPLORE}], not {share}")
    if decision.reason in (Reason.EXPLICIT, Reason.UNSCORED, Reason.FAILOVER):
        return Explored(decision, 1.0, decision.backend)
    others = sorted(b for b in allowed if b != decision.backend)
    if share == 0.0 or not others:
        return Explored(decision, 1.0, decision.backend)
    if rng.random() >= share:
        return Explored(decision, 1.0 - share, decision.backend)
    target = others[rng.randrange(len(others))]
    order = (target, *(b for b in decision.order if b != target))
    return Explored(Decision(target, Reason.EXPLORE, order), share / len(others), decision.backend)


def propensity(backend: str, chosen: str, allowed: Collection[str], share: float) -> float:
    """The probability that ``explore`` sends a request whose policy choice is ``chosen`` to ``backend``."""
    others = [b for b in allowed if b != chosen]
    if backend == chosen:
        return 1.0 - share if others and share > 0 else 1.0
    if backend not in others or share == 0:
        return 0.0
    return share / len(others)
