"""The routing policy: pure functions from estimates and costs to a decision. No I/O, no state."""

from __future__ import annotations

import math
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
    AFFINITY = "affinity"  # a later turn of a conversation kept the backend of its first turn (router.affinity)


class Stage(StrEnum):
    """Which estimates decided a routed request (the cascade, router.routing): the cheapest that were clear."""

    CACHE = "cache"  # the same prompt's estimates, made before for the same key and probes
    TEXT = "text"  # the text-only models: no scorer pass
    EARLY = "early"  # the models at an early block: the pass stopped there
    SCORER = "scorer"  # the full probes on the whole pass


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


@dataclass(frozen=True)
class Rule:
    """What a decision depends on besides the estimates: the policy's mode and its settings (``policy.*``)."""

    mode: str = "threshold"  # "threshold" or "utility"
    threshold: float = 0.8
    cost_weight: float = 0.5
    fallback: str | None = None
    margin: float = 0.0  # utility mode: the fallback keeps a request unless beaten by more than this

    def as_dict(self) -> dict[str, object]:
        if self.mode == "utility":
            return {"mode": self.mode, "cost_weight": self.cost_weight, "fallback": self.fallback,
                    "margin": self.margin}
        return {"mode": self.mode, "threshold": self.threshold, "fallback": self.fallback}


def choose(options: Sequence[Option], rule: Rule) -> Decision:
    """The decision ``rule`` makes on ``options`` (``choose_by_threshold`` or ``choose_by_utility``)."""
    if rule.mode == "utility":
        return choose_by_utility(options, rule.cost_weight, rule.fallback, rule.margin)
    if rule.mode == "threshold":
        return choose_by_threshold(options, rule.threshold, rule.fallback)
    raise ValueError(f"unknown policy mode {rule.mode!r}")


# Radii are shrunk by this much, so that rounding in p ± m can never turn a clear decision.
_ROUNDING = 1e-12


def decision_radius(options: Sequence[Option], rule: Rule) -> tuple[Decision, float]:
    """The decision on ``options`` and its radius r: any estimates each less than r from these (|p'ᵢ − pᵢ| < r
    for every option, costs unchanged) send the request to the same backend. ``inf`` when nothing could change
    it (one option); 0 when an estimate sits exactly on the boundary (a tie, or p = threshold).

    The radius is exact up to ties and rounding, where it errs small (never claims a decision is clear when it is
    not): a cascade may let a cheap estimate decide a request when its radius exceeds the cheap estimate's
    error (``clear_decision``). What counts is the backend; the reason and the failover order are the ones these
    estimates give.

    Threshold mode (the cheapest option with p ≥ t; else the fallback; else the best p), for a decision j:
    every option that could come before j in the order by cost must stay below t (cheaper ones; one as cheap,
    unless it stays below j's estimate), and j must stay at or above t, unless j is what the request gets when
    no option clears (the fallback, or the best estimate when there is no fallback) and no other option can
    clear. Utility mode (argmax u = p − λ·cost/max cost): every utility moves by as much as its estimate, so the
    winner must beat each other option by more than 2r; with ``policy.margin`` M and a fallback f, f keeps the
    request while the best other utility beats f's by at most M, so the decision stays f while that lead D
    stays within M (r = (M − D)/2) and stays another's while D stays above M (r ≤ (D − M)/2).
    """
    decision = choose(options, rule)
    if len(options) < 2:
        return decision, math.inf
    radius = _utility_radius(options, rule, decision) if rule.mode == "utility" else \
        _threshold_radius(options, rule, decision)
    return decision, max(radius - _ROUNDING, 0.0)


def clear_decision(options: Sequence[Option], rule: Rule, error: float) -> Decision | None:
    """The decision on ``options`` if it is the same backend for any estimates within ``error`` of these (each
    estimate off by less than ``error``, or ``error`` ≤ 0), else None: the estimates cannot decide alone."""
    decision, radius = decision_radius(options, rule)
    return decision if error <= 0 or error < radius else None


def _threshold_radius(options: Sequence[Option], rule: Rule, decision: Decision) -> float:
    t = rule.threshold
    names = {o.name for o in options}
    fallback = rule.fallback if rule.fallback in names else None
    chosen = next(o for o in options if o.name == decision.backend)
    others = [o for o in options if o.name != chosen.name]
    # when nothing clears: the other options stay below t
    none_clear = min(t - o.p for o in others)
    if decision.reason is Reason.FALLBACK:
        return none_clear
    if decision.reason is Reason.BEST:
        return min(none_clear, min((chosen.p - o.p) / 2 for o in others))
    # reason THRESHOLD: nothing that could come before it clears ...
    ahead = [t - o.p if o.cost < chosen.cost else max(t - o.p, (chosen.p - o.p) / 2)
             for o in others if o.cost <= chosen.cost]
    # ... and it clears, or, failing to, it still gets the request as the fallback or the best estimate
    if chosen.name == fallback:
        alternative = none_clear
    elif fallback is None:
        alternative = min(none_clear, min((chosen.p - o.p) / 2 for o in others))
    else:
        alternative = 0.0
    return min([*ahead, max(chosen.p - t, alternative)])


def _utility_radius(options: Sequence[Option], rule: Rule, decision: Decision) -> float:
    top = max(o.cost for o in options) or 1.0
    utility = {o.name: o.p - rule.cost_weight * o.cost / top for o in options}
    held = rule.fallback if rule.fallback in utility and rule.margin > 0 else None
    if held is not None:
        lead = max(u for n, u in utility.items() if n != held) - utility[held]  # D: the best other's lead over it
        if decision.backend == held:
            return (rule.margin - lead) / 2
        beyond_margin = (lead - rule.margin) / 2
    else:
        beyond_margin = math.inf
    won = utility[decision.backend]
    return min(beyond_margin, min((won - u) / 2 for n, u in utility.items() if n != decision.backend))
