"""The fleet benchmark's ratios and its Markdown, on made-up results (the benchmark itself is ``make bench``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loadtest.fleet import END, START, FleetCell, ratios, table
from loadtest.report import replace_section


def _cell(rps: float, p50: float, balancer_cpu: float | None = 0.05, unscored: float = 0) -> dict[str, Any]:
    return {"rps": rps, "rps_rounds": [rps], "requests": 100, "errors": 0,
            "latency_ms": {"p50": p50, "p90": p50, "p99": 2 * p50}, "cpu_ms_per_request": 0.5,
            "balancer_cpu_ms_per_request": balancer_cpu, "unscored": unscored}


SCENARIOS = {
    "explicit c=64": {"direct": _cell(2000, 30, None), "nginx-1": _cell(1600, 38), "nginx-2": _cell(1700, 36)},
    "routed c=16": {"direct": _cell(15, 1000, None), "nginx-1": _cell(14.7, 1010), "nginx-2": _cell(14, 1100, 0.1, 2)},
}


def test_ratios_are_balancer_cost_and_scaling_per_scenario() -> None:
    q = ratios(SCENARIOS)
    assert q["explicit_balancer_rps_ratio"] == 0.8 and q["explicit_balancer_added_p50_ms"] == 8
    assert q["explicit_two_replicas_rps_ratio"] == 1.062 and q["explicit_balancer_cpu_ms_per_request"] == 0.05
    assert q["routed_balancer_rps_ratio"] == 0.98 and q["routed_two_replicas_rps_ratio"] == 0.952


def test_a_cell_splits_the_balancers_cpu_from_the_replicas() -> None:
    cell = FleetCell(rps=[10.0, 12.0, 11.0], latencies_s=[0.1] * 40, requests=40, cpu_s=0.02, balancer_cpu_s=0.004,
                     unscored=3)
    s = cell.summary()
    assert s["rps"] == 11.0 and s["cpu_ms_per_request"] == 0.5 and s["balancer_cpu_ms_per_request"] == 0.1
    assert s["unscored"] == 3


def test_the_section_replaces_only_its_markers(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"# Benchmarks\n\n{START}\nold\n{END}\n\nafter\n")
    results = {"started": "2026-11-27T13:00:00+0000", "rounds": 5, "duration_s": 150.0,
               "machine": {"nproc": 2, "cpu": "AMD EPYC", "memory_gib": 23.5, "python": "3.11.7"},
               "scenarios": SCENARIOS, "ratios": ratios(SCENARIOS), "command": "python -m loadtest.fleet"}
    replace_section(doc, START, END, table(results))
    text = doc.read_text()
    assert text.endswith("after\n") and "old" not in text
    assert "| explicit c=64 | nginx → 1 replica | 1,600.0 | 38.00 | 76.00 | 0.500 | 0.050 | 0 | 0 |" in text
    assert "| routed c=16 | replica 0 directly | 15.0 | 1,000.00 | 2,000.00 | 0.500 | – | 0 | 0 |" in text
    assert "| balancer cost: nginx → 1 replica / replica directly | 0.80× | 0.98× |" in text
    assert "| scaling: nginx → 2 replicas / nginx → 1 replica | 1.06× | 0.95× |" in text
