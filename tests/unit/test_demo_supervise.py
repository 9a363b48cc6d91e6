"""The demos' life cycle (scripts/demo.py ``supervise``): however the front process's wait ends, the clean-up runs
once, deaf to signals, and the exit status says how it ended. The real demos are stopped end to end in
tests/integration/test_demo_stop.py and test_demo_fleet.py."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator

import pytest

from scripts.demo import Stopping, supervise


@pytest.fixture(autouse=True)
def restore_signals() -> Iterator[None]:
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def run(start_and_wait: Callable[[], int]) -> tuple[int, list[str]]:
    events: list[str] = []

    def clean_up() -> None:
        events.append(f"clean-up, SIGTERM ignored: {signal.getsignal(signal.SIGTERM) is signal.SIG_IGN}, "
                      f"SIGINT ignored: {signal.getsignal(signal.SIGINT) is signal.SIG_IGN}")

    status = supervise(start_and_wait, clean_up, "everything", events.append)
    return status, events


CLEAN_UP = "clean-up, SIGTERM ignored: True, SIGINT ignored: True"


def test_the_front_process_exit_status_is_the_demos() -> None:
    assert run(lambda: 3) == (3, [CLEAN_UP])


def test_the_first_signal_stops_and_cleans_up() -> None:
    def stopped() -> int:
        raise Stopping("SIGTERM")

    assert run(stopped) == (0, ["SIGTERM: stopping everything ...", CLEAN_UP])


@pytest.mark.parametrize("error", [RuntimeError("vLLM server exited"), TimeoutError("gateway not ready")])
def test_a_start_up_error_exits_1_after_cleaning_up(error: Exception, capsys: pytest.CaptureFixture[str]) -> None:
    def failing() -> int:
        raise error

    assert run(failing) == (1, [CLEAN_UP])
    assert capsys.readouterr().err == f"error: {error}\n"


def test_anything_else_propagates_after_cleaning_up() -> None:
    def broken() -> int:
        raise KeyError("bug")

    events: list[str] = []
    with pytest.raises(KeyError):
        supervise(broken, lambda: events.append("clean-up"), "everything", events.append)
    assert events == ["clean-up"]
