"""The routing policy: pure functions from estimates and costs to a decision. No I/O, no state."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum


class Reason(StrEnum):
    THRESHOLD = "threshold_met"  # the cheapest backend whose estimate clears the threshold
    BEST = "best_estimate"  # none cleared it: the highest estimate
    FALLBACK = "fallback"  # none cleared it: the configured fallback backend
    UTILITY = "utility"  # argmax p − λ·normalised cost
    EXPLICIT = "explicit_backend"  # the request named a backend
    UNSCORED = "unscored"  # the scorer could not score this request: the fallback, else the dearest backend
    FAILOVER = "failover"  # the chosen backend failed before answering: the next in the decision's order
    EXPLORE = "explore"  # sent, with a small probability (policy.explore), to a backend the policy did not choose


@dataclass(frozen=True)
class Option:
    name: str
    cost: float  # estimated USD for this request on this backend
    p: float  # estimated probability of a correct answer


@dataclass(frozen=True)
class Decision:
    backend: str
    reason: Reason
    order: tuple[str, ...]  # the chosen backend first, then the others in the order to fail over to


def request_cost(input_per_mtok: float, output_per_mtok: float, prompt_tokens: int, output_tokens: int) -> float:
    """USD for one request at per-million-token prices."""
    return (input_per_mtok * prompt_tokens + output_per_mtok * output_tokens) / 1e6


def _by_cost(options: Sequence[Option]) -> list[Option]:
    return sorted(options, key=lambda o: (o.cost, -o.p, o.name))


def _by_p(options: Sequence[Option]) -> list[Option]:
    return sorted(options, key=lambda o: (-o.p, o.cost, o.name))


def choose_by_threshold(options: Sequence[Option], threshold: float, fallback: str | None = None) -> Decision:
    """The cheapest option with p ≥ threshold; otherwise ``fallback`` if it is an option, else the best p.

    The failover order after the choice: the other options that clear the threshold, cheapest first, then the
    rest by estimate.
    """
    if not options:
        raise ValueError("no backend to choose from")
    clearing = _by_cost([o for o in options if o.p >= threshold])
    rest = _by_p([o for o in options if o.p < threshold])
    order = [o.name for o in clearing + rest]
    if clearing:
        return Decision(clearing[0].name, Reason.THRESHOLD, tuple(order))
    if fallback is not None and fallback in order:
        order.remove(fallback)
        return Decision(fallback, Reason.FALLBACK, (fallback, *order))
    return Decision(order[0], Reason.BEST, tuple(order))


def choose_by_utility(options: Sequence[Option], cost_weight: float, fallback: str | None = None,
                      margin: float = 0.0) -> Decision:
    """argmax p − λ·cost/max cost (the paper's utility router); ties go to the cheaper option.

    With a ``margin``, the ``fallback`` option keeps the request unless another option's utility beats its own by
    more than ``margin``. Estimates closer together than their error otherwise send requests to whichever
    backend's estimate happens to be highest by chance (a winner's curse), which can cost accuracy even when
    every estimate is calibrated on its own.
    """
    if not options:
        raise ValueError("no backend to choose from")
    top = max(o.cost for o in options) or 1.0

    def utility(o: Option) -> float:
        return o.p - cost_weight * o.cost / top

    ranked = sorted(options, key=lambda o: (-utility(o), o.cost, o.name))
    held = next((o for o in ranked if o.name == fallback), None)
    if held is not None and margin > 0 and utility(ranked[0]) - utility(held) <= margin:
        ranked.remove(held)
        ranked.insert(0, held)
    return Decision(ranked[0].name, Reason.UTILITY, tuple(o.name for o in ranked))
