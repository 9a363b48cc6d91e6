from __future__ import annotations

import pytest

from loadtest.procs import rotating_rounds


def test_rotating_rounds_runs_each_variant_once_a_round_in_a_rotating_order(capsys: pytest.CaptureFixture[str]) -> None:
    out = rotating_rounds("tests.support.echo_argv", ["--x", "1"], "--variant", ["a", "b", "c"], 3,
                          describe=lambda m: f"{len(m['argv'])} args; ")
    assert {v: [m["round"] for m in ms] for v, ms in out.items()} == {"a": [0, 1, 2], "b": [0, 1, 2], "c": [0, 1, 2]}
    assert out["b"][0]["argv"] == ["--x", "1", "--variant", "b"]
    assert all(m["exit_status"] == 0 for ms in out.values() for m in ms)
    order = [line.split()[2].rstrip(":") for line in capsys.readouterr().err.splitlines()]
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]


def test_a_process_that_printed_is_kept_whatever_its_status_and_one_that_did_not_stops_the_run() -> None:
    out = rotating_rounds("tests.support.echo_argv", ["--exit", "3"], "--variant", ["a"], 1)
    assert out["a"][0]["exit_status"] == 3
    with pytest.raises(SystemExit, match="printed nothing"):
        rotating_rounds("tests.support.no_such_module", [], "--variant", ["a"], 1)
