from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from router.policy import Option, Reason, choose_by_threshold, choose_by_utility, request_cost

CHEAP = Option("small", cost=1.0, p=0.70)
MID = Option("mid", cost=2.0, p=0.85)
DEAR = Option("large", cost=4.0, p=0.95)


def test_cheapest_option_clearing_the_threshold_wins() -> None:
    d = choose_by_threshold([DEAR, CHEAP, MID], threshold=0.8)
    assert (d.backend, d.reason) == ("mid", Reason.THRESHOLD)
    assert d.order == ("mid", "large", "small")


def test_a_low_threshold_takes_the_cheapest() -> None:
    assert choose_by_threshold([DEAR, CHEAP, MID], threshold=0.5).backend == "small"


def test_none_clearing_takes_the_best_estimate() -> None:
    d = choose_by_threshold([DEAR, CHEAP, MID], threshold=0.99)
    assert (d.backend, d.reason) == ("large", Reason.BEST)
    assert d.order == ("large", "mid", "small")


def test_none_clearing_takes_the_configured_fallback() -> None:
    d = choose_by_threshold([DEAR, CHEAP, MID], threshold=0.99, fallback="small")
    assert (d.backend, d.reason) == ("small", Reason.FALLBACK)
    assert d.order == ("small", "large", "mid")


def test_threshold_is_inclusive() -> None:
    assert choose_by_threshold([CHEAP, DEAR], threshold=0.70).backend == "small"


def test_utility_trades_estimate_against_normalised_cost() -> None:
    # utilities with λ=0.5: small 0.70-0.125=0.575, mid 0.85-0.25=0.60, large 0.95-0.5=0.45
    assert choose_by_utility([CHEAP, MID, DEAR], cost_weight=0.5).backend == "mid"
    assert choose_by_utility([CHEAP, MID, DEAR], cost_weight=0.0).backend == "large"
    assert choose_by_utility([CHEAP, MID, DEAR], cost_weight=2.0).backend == "small"


def test_a_margin_keeps_the_fallback_unless_another_utility_beats_it_by_more() -> None:
    # λ=0: large 0.95 beats small 0.70 by 0.25 and mid 0.85 by 0.10
    assert choose_by_utility([CHEAP, MID, DEAR], 0.0, fallback="mid", margin=0.1).backend == "mid"
    d = choose_by_utility([CHEAP, MID, DEAR], 0.0, fallback="mid", margin=0.09)
    assert (d.backend, d.order) == ("large", ("large", "mid", "small"))
    d = choose_by_utility([CHEAP, MID, DEAR], 0.0, fallback="small", margin=0.3)
    assert (d.backend, d.reason, d.order) == ("small", Reason.UTILITY, ("small", "large", "mid"))
    assert choose_by_utility([CHEAP, MID, DEAR], 0.0, fallback="gone", margin=0.3).backend == "large"


def test_request_cost_uses_per_million_token_prices() -> None:
    assert request_cost(0.10, 0.20, prompt_tokens=1000, output_tokens=500) == pytest.approx(0.0002)


def test_no_options_is_an_error() -> None:
    with pytest.raises(ValueError):
        choose_by_threshold([], 0.5)


options = st.lists(
    st.builds(Option, name=st.text("abcdefgh", min_size=1, max_size=4),
              cost=st.floats(0, 100, allow_nan=False), p=st.floats(0, 1, allow_nan=False)),
    min_size=1, max_size=6, unique_by=lambda o: o.name,
)


@given(options, st.floats(0, 1))
def test_threshold_choice_properties(opts: list[Option], threshold: float) -> None:
    d = choose_by_threshold(opts, threshold)
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
    chosen = next(o for o in opts if o.name == choose_by_utility(opts, weight).backend)
    assert not any(o.p > chosen.p and o.cost < chosen.cost for o in opts)
