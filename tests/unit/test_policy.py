from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router import policy
from router.policy import Option, Reason, Rule

CHEAP = Option("small", cost=1.0, p=0.70)
MID = Option("mid", cost=2.0, p=0.85)
DEAR = Option("large", cost=4.0, p=0.95)


def test_cheapest_option_clearing_the_threshold_wins() -> None:
    d = policy.choose_by_threshold([DEAR, CHEAP, MID], threshold=0.8)
    assert (d.backend, d.reason) == ("mid", Reason.THRESHOLD)
    assert d.order == ("mid", "large", "small")


def test_a_low_threshold_takes_the_cheapest() -> None:
    assert policy.choose_by_threshold([DEAR, CHEAP, MID], threshold=0.5).backend == "small"


def test_none_clearing_takes_the_best_estimate() -> None:
    d = policy.choose_by_threshold([DEAR, CHEAP, MID], threshold=0.99)
    assert (d.backend, d.reason) == ("large", Reason.BEST)
    assert d.order == ("large", "mid", "small")


def test_none_clearing_takes_the_configured_fallback() -> None:
    d = policy.choose_by_threshold([DEAR, CHEAP, MID], threshold=0.99, fallback="small")
    assert (d.backend, d.reason) == ("small", Reason.FALLBACK)
    assert d.order == ("small", "large", "mid")


def test_threshold_is_inclusive() -> None:
    assert policy.choose_by_threshold([CHEAP, DEAR], threshold=0.70).backend == "small"


def test_utility_trades_estimate_against_normalised_cost() -> None:
    # utilities with λ=0.5: small 0.70-0.125=0.575, mid 0.85-0.25=0.60, large 0.95-0.5=0.45
    assert policy.choose_by_utility([CHEAP, MID, DEAR], cost_weight=0.5).backend == "mid"
    assert policy.choose_by_utility([CHEAP, MID, DEAR], cost_weight=0.0).backend == "large"
    assert policy.choose_by_utility([CHEAP, MID, DEAR], cost_weight=2.0).backend == "small"


def test_a_margin_keeps_the_fallback_unless_another_utility_beats_it_by_more() -> None:
    # λ=0: large 0.95 beats small 0.70 by 0.25 and mid 0.85 by 0.10
    assert policy.choose_by_utility([CHEAP, MID, DEAR], 0.0, fallback="mid", margin=0.1).backend == "mid"
    d = policy.choose_by_utility([CHEAP, MID, DEAR], 0.0, fallback="mid", margin=0.09)
    assert (d.backend, d.order) == ("large", ("large", "mid", "small"))
    d = policy.choose_by_utility([CHEAP, MID, DEAR], 0.0, fallback="small", margin=0.3)
    assert (d.backend, d.reason, d.order) == ("small", Reason.UTILITY, ("small", "large", "mid"))
    assert policy.choose_by_utility([CHEAP, MID, DEAR], 0.0, fallback="gone", margin=0.3).backend == "large"


def test_request_cost_uses_per_million_token_prices() -> None:
    assert policy.request_cost(0.10, 0.20, prompt_tokens=1000, output_tokens=500) == pytest.approx(0.0002)


def test_no_options_is_an_error() -> None:
    with pytest.raises(ValueError):
        policy.choose_by_threshold([], 0.5)


options = st.lists(
    st.builds(Option, name=st.text("abcdefgh", min_size=1, max_size=4),
              cost=st.floats(0, 100, allow_nan=False), p=st.floats(0, 1, allow_nan=False)),
    min_size=1, max_size=6, unique_by=lambda o: o.name,
)


@given(options, st.floats(0, 1))
def test_threshold_choice_properties(opts: list[Option], threshold: float) -> None:
    d = policy.choose_by_threshold(opts, threshold)
    chosen = next(o for o in opts if o.name == d.backend)
    assert sorted(d.order) == sorted(o.name for o in opts) and d.order[0] == d.backend
    clearing = [o for o in opts if o.p >= threshold]
    if clearing:
        assert chosen.p >= threshold
        assert chosen.cost == min(o.cost for o in clearing)
    else:
        assert chosen.p == max(o.p for o in opts)


@given(options, st.floats(0, 10, allow_nan=False))
def test_utility_choice_is_never_dominated(opts: list[Option], weight: float) -> None:
    chosen = next(o for o in opts if o.name == policy.choose_by_utility(opts, weight).backend)
    assert not any(o.p > chosen.p and o.cost < chosen.cost for o in opts)


# --- Clear decisions: is the decision the same for any estimates within ±m of these? -------------------------


def _opts(*specs: tuple[str, float, float]) -> list[Option]:
    return [Option(n, c, p) for n, c, p in specs]


def _moved(opts: list[Option], deltas: dict[str, float]) -> list[Option]:
    return [Option(o.name, o.cost, o.p + deltas.get(o.name, 0.0)) for o in opts]


TWO = _opts(("cheap", 1.0, 0.9), ("dear", 4.0, 0.95))


def test_two_backends_are_clear_while_the_cheap_estimate_is_far_from_the_threshold() -> None:
    rule = Rule("threshold", threshold=0.8, fallback="dear")
    decision, radius = policy.decision_radius(TWO, rule)
    assert decision.backend == "cheap" and radius == pytest.approx(0.1)
    assert policy.clear_decision(TWO, rule, 0.09) == decision
    assert policy.clear_decision(TWO, rule, 0.1) is None  # 0.9 − 0.1 = 0.8 would still clear, but the radius is strict
    # the dear backend, chosen by threshold or as the fallback: only the cheap estimate matters, whatever the dear's
    for dear_p in (0.99, 0.81, 0.8, 0.5, 0.1):
        opts = _opts(("cheap", 1.0, 0.6), ("dear", 4.0, dear_p))
        decision, radius = policy.decision_radius(opts, rule)
        assert decision.backend == "dear" and radius == pytest.approx(0.2)


def test_the_threshold_radius_of_the_chosen_backend_and_the_cheaper_ones() -> None:
    opts = _opts(("a", 1.0, 0.70), ("b", 2.0, 0.85), ("c", 4.0, 0.95))
    # b: a stays below 0.8 (0.10), b stays above (0.05); c does not matter (b is not the fallback)
    d, r = policy.decision_radius(opts, Rule("threshold", threshold=0.8))
    assert d.backend == "b" and r == pytest.approx(0.05)
    d, r = policy.decision_radius(opts, Rule("threshold", threshold=0.8, fallback="c"))
    assert d.backend == "b" and r == pytest.approx(0.05)
    # none clears 0.99: the fallback keeps it while no other estimate reaches 0.99 (a: 0.29, b: 0.14)
    d, r = policy.decision_radius(opts, Rule("threshold", threshold=0.99, fallback="c"))
    assert (d.backend, d.reason) == ("c", Reason.FALLBACK) and r == pytest.approx(0.14)
    # no fallback: the best estimate, while it stays the best (c − b = 0.10 → 0.05) and no other clears (0.14); c
    # itself may reach 0.99 (then it clears, and is still the choice)
    d, r = policy.decision_radius(opts, Rule("threshold", threshold=0.99))
    assert (d.backend, d.reason) == ("c", Reason.BEST) and r == pytest.approx(0.05)
    # the dearest clears and is the fallback: it keeps the request whether or not it clears, while a and b stay
    # below 0.9 (b: 0.05)
    d, r = policy.decision_radius(opts, Rule("threshold", threshold=0.9, fallback="c"))
    assert (d.backend, d.reason) == ("c", Reason.THRESHOLD) and r == pytest.approx(0.05)


def test_an_equally_cheap_backend_matters_only_if_it_could_clear_and_overtake() -> None:
    rule = Rule("threshold", threshold=0.8)
    opts = _opts(("a", 1.0, 0.95), ("b", 1.0, 0.85), ("c", 4.0, 0.5))
    d, r = policy.decision_radius(opts, rule)  # b clears too, but stays behind a while 0.95 − m > 0.85 + m
    assert d.backend == "a" and r == pytest.approx(0.05)
    opts = _opts(("a", 1.0, 0.95), ("b", 1.0, 0.5), ("c", 4.0, 0.5))
    # b cannot clear within 0.3; a keeps it below 0.8 too, as the best estimate
    d, r = policy.decision_radius(opts, rule)
    assert d.backend == "a" and r == pytest.approx((0.95 - 0.5) / 2)
    d, r = policy.decision_radius(opts, Rule("threshold", threshold=0.8, fallback="c"))  # not with another fallback
    assert d.backend == "a" and r == pytest.approx(0.15)


def test_ties_and_estimates_on_the_threshold_are_never_clear() -> None:
    rule = Rule("threshold", threshold=0.8)
    assert policy.decision_radius(_opts(("a", 1.0, 0.8), ("b", 2.0, 0.9)), rule)[1] == 0.0
    assert policy.decision_radius(_opts(("a", 1.0, 0.5), ("b", 1.0, 0.5)), rule)[1] == 0.0  # best by name
    assert policy.decision_radius(_opts(("a", 1.0, 0.5), ("b", 2.0, 0.5)), Rule("utility", cost_weight=0.0))[1] == 0.0
    # but with no error at all every decision stands
    assert policy.clear_decision(_opts(("a", 1.0, 0.8), ("b", 2.0, 0.9)), rule, 0.0) is not None


def test_one_option_is_always_clear() -> None:
    d, r = policy.decision_radius(_opts(("a", 1.0, 0.1)), Rule("threshold", threshold=0.9))
    assert d.backend == "a" and r == math.inf
    assert policy.clear_decision(_opts(("a", 1.0, 0.1)), Rule("utility"), 0.5) is not None


def test_utility_radius_is_half_the_winners_lead() -> None:
    opts = _opts(("small", 1.0, 0.70), ("mid", 2.0, 0.85), ("large", 4.0, 0.95))
    # λ = 0.5: small 0.575, mid 0.60, large 0.45 → mid by 0.025 over small
    d, r = policy.decision_radius(opts, Rule("utility", cost_weight=0.5))
    assert d.backend == "mid" and r == pytest.approx(0.0125)
    assert policy.clear_decision(opts, Rule("utility", cost_weight=0.5), 0.012) == d
    assert policy.clear_decision(opts, Rule("utility", cost_weight=0.5), 0.013) is None


def test_utility_radius_with_the_fallback_margin() -> None:
    opts = _opts(("small", 1.0, 0.70), ("mid", 2.0, 0.85), ("large", 4.0, 0.95))
    # λ = 0: large leads mid by 0.10. Margin 0.2: mid keeps it while the lead stays ≤ 0.2 → (0.2 − 0.1) / 2
    d, r = policy.decision_radius(opts, Rule("utility", cost_weight=0.0, fallback="mid", margin=0.2))
    assert d.backend == "mid" and r == pytest.approx(0.05)
    # margin 0.04: large wins while its lead stays above 0.04 → (0.10 − 0.04) / 2 = 0.03 (its lead over small is
    # wider)
    d, r = policy.decision_radius(opts, Rule("utility", cost_weight=0.0, fallback="mid", margin=0.04))
    assert d.backend == "large" and r == pytest.approx(0.03)
    # the fallback is the best anyway: it keeps the request while the best other stays within the margin of it
    d, r = policy.decision_radius(opts, Rule("utility", cost_weight=0.0, fallback="large", margin=0.02))
    assert d.backend == "large" and r == pytest.approx((0.02 + 0.10) / 2)


def test_choose_dispatches_on_the_mode() -> None:
    opts = _opts(("small", 1.0, 0.70), ("mid", 2.0, 0.85), ("large", 4.0, 0.95))
    assert policy.choose(opts, Rule("threshold", threshold=0.8)) == policy.choose_by_threshold(opts, 0.8)
    assert policy.choose(opts, Rule("utility", cost_weight=0.5, fallback="small", margin=0.1)) == \
        policy.choose_by_utility(opts, 0.5, "small", 0.1)
    with pytest.raises(ValueError, match="mode"):
        policy.choose(opts, Rule("lottery"))


probabilities = st.floats(0, 1, allow_nan=False)
costs = st.sampled_from([0.0, 1.0, 1.0, 2.0, 4.0, 4.0])  # repeats: equally cheap backends happen
pool = st.lists(st.builds(Option, name=st.sampled_from("abcde"), cost=costs,
                          p=st.one_of(probabilities, st.sampled_from([0.5, 0.8, 0.9]))),
                min_size=1, max_size=5, unique_by=lambda o: o.name)


@st.composite
def rules(draw: st.DrawFn) -> Rule:
    fallback = draw(st.sampled_from([None, "a", "b", "c", "z"]))
    if draw(st.booleans()):
        return Rule("threshold", threshold=draw(st.one_of(probabilities, st.sampled_from([0.5, 0.8]))),
                    fallback=fallback)
    return Rule("utility", cost_weight=draw(st.sampled_from([0.0, 0.1, 0.5, 3.0])), fallback=fallback,
                margin=draw(st.sampled_from([0.0, 0.05, 0.2])))


@settings(max_examples=300)
@given(pool, rules(), st.floats(0, 0.5, allow_nan=False),
       st.lists(st.one_of(st.sampled_from([-1.0, 1.0]), st.floats(-1, 1)), min_size=5, max_size=5))
def test_a_clear_decision_survives_every_perturbation_within_the_margin(
    opts: list[Option], rule: Rule, margin: float, moves: list[float],
) -> None:
    decision = policy.clear_decision(opts, rule, margin)
    if decision is None:
        return
    assert decision == policy.choose(opts, rule)
    moved = _moved(opts, {o.name: margin * u for o, u in zip(opts, moves, strict=False)})
    assert policy.choose(moved, rule).backend == decision.backend


@settings(max_examples=300)
@given(pool, rules())
def test_the_radius_is_tight(opts: list[Option], rule: Rule) -> None:
    """Just beyond the radius, some corner of the box of perturbations changes the decision (the radius is not
    merely safe but the largest safe one)."""
    decision, radius = policy.decision_radius(opts, rule)
    if not math.isfinite(radius):
        assert len(opts) == 1
        return
    m = radius + 1e-6
    corners = itertools.product((-m, 0.0, m), repeat=len(opts))
    assert any(policy.choose(_moved(opts, dict(zip([o.name for o in opts], c, strict=True))), rule).backend
               != decision.backend for c in corners)
