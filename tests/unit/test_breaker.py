from __future__ import annotations

from router.breaker import Breaker, State
from tests.support.fakes import Clock


def test_opens_after_consecutive_failures_and_trials_after_the_cooldown() -> None:
    clock = Clock(0.0)
    b = Breaker(failure_threshold=2, cooldown_s=10, clock=clock)
    b.failure()
    assert b.current is State.CLOSED and b.available()
    b.failure()
    assert b.current is State.OPEN and not b.available()
    clock.now = 9.9
    assert not b.available()
    clock.now = 10.0
    assert b.current is State.HALF_OPEN and b.available()
    b.begin()  # the one trial
    assert not b.available()
    b.success()
    assert b.current is State.CLOSED and b.available() and b.failures == 0


def test_a_failed_trial_reopens_for_another_cooldown() -> None:
    clock = Clock(0.0)
    b = Breaker(failure_threshold=1, cooldown_s=5, clock=clock)
    b.failure()
    clock.now = 5
    b.begin()
    b.failure()
    assert b.current is State.OPEN
    clock.now = 9
    assert not b.available()
    clock.now = 10
    assert b.available()


def test_a_success_resets_the_count() -> None:
    b = Breaker(failure_threshold=2, clock=Clock(0.0))
    b.failure()
    b.success()
    b.failure()
    assert b.current is State.CLOSED


def test_a_passing_health_check_lets_an_open_circuit_try_one_request() -> None:
    b = Breaker(failure_threshold=1, cooldown_s=60, clock=Clock(0.0))
    b.healthy()
    assert b.current is State.CLOSED  # nothing to do when closed
    b.failure()
    assert not b.available()
    b.healthy()
    assert b.current is State.HALF_OPEN and b.available()
