"""The benchmark's arithmetic and its Markdown, on made-up results (the benchmark itself is ``make bench``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from loadtest.report import END, START, write_markdown
from loadtest.run import derive, median_forward


def _cell(rps: float, p50: float, mean: float | None = None, cpu: float = 0.3) -> dict[str, Any]:
    return {"rps": rps, "rps_rounds": [rps], "requests": 100, "errors": 0,
            "latency_ms": {"p50": p50, "p90": p50, "p99": p50}, "mean_latency_ms": mean, "ttfb_ms": {},
            "cpu_ms_per_request": cpu, "loop_cpu_ms_per_request": cpu, "peak_rss_mb": 50.0}


SCENARIOS = {
    "chat c=64": {"direct": _cell(30000, 1), "floor": _cell(4000, 13), "gateway": _cell(3800, 14),
                  "untuned": _cell(1900, 20), "litellm": _cell(100, 300)},
    "chat c=1": {"direct": _cell(10000, 0.1), "floor": _cell(2000, 0.5), "gateway": _cell(1900, 0.6),
                 "litellm": _cell(110, 9.1)},
    "routed c=1": {"gateway": _cell(1500, 0.6, mean=0.7), "routed": _cell(10, 95, mean=100.7)},
    "routed c=16": {"routed": {**_cell(10, 1500), "mean_scorer_batch": 8.0}},
}
FORWARD = {"threads": 1, "dtype": "bfloat16", "layers": [15], "prompts": 32,
           "batches": [{"batch": 1, "ms_per_batch": 95.0, "ms_per_prompt": 95.0},
                       {"batch": 8, "ms_per_batch": 800.0, "ms_per_prompt": 100.0}]}


def test_derive_turns_the_scenarios_into_the_issues_ratios() -> None:
    t = derive(SCENARIOS, FORWARD)
    assert t["explicit_vs_floor_throughput"] == 0.95
    assert t["explicit_vs_litellm_throughput"] == 38.0
    assert t["explicit_vs_untuned_gc_throughput"] == 2.0
    assert t["gateway_added_p50_ms_c1"] == pytest.approx(0.5)
    assert t["scorer_ms_per_request_c1"] == 100.0 and t["scorer_vs_forward_b1"] == pytest.approx(100 / 95, abs=1e-3)
    assert t["scorer_ms_per_request_c16"] == 100.0 and t["scorer_vs_forward_b8"] == 1.0


def test_the_table_replaces_only_the_text_between_the_markers(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"# Benchmarks\n\nintro\n\n{START}\nold table\n{END}\n\nprose after\n")
    results = {"started": "2026-11-25T15:00:00+0000", "rounds": 5, "duration_s": 170.0,
               "machine": {"nproc": 2, "cpu": "AMD EPYC", "memory_gib": 23.5, "python": "3.11.7"},
               "scenarios": SCENARIOS, "forward_pass": FORWARD,
               "gc": {"tracked_objects": 424450, "full_collection_ms": 190.3, "full_collection_us_frozen": 2.1},
               "targets": derive(SCENARIOS, FORWARD)}
    write_markdown(doc, results)
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nintro\n") and text.endswith("prose after\n") and "old table" not in text
    assert "| chat c=64 | probe-router, explicit backend, Python's default GC | 1,900 |" in text
    assert "| explicit path throughput / bare pass-through (c=64) | 0.95 | ≥ 0.90 | yes |" in text
    assert "| explicit path throughput / LiteLLM (c=64) | 38 | ≥ 25× | yes |" in text
    assert "424,450 tracked objects; a full collection takes 190.3 ms, 2.1 µs after `gc.freeze()`" in text


def test_the_forward_pass_is_the_median_of_its_rounds() -> None:
    runs = [{**FORWARD, "batches": [{"batch": 1, "ms_per_batch": ms, "ms_per_prompt": ms},
                                    {"batch": 8, "ms_per_batch": 8 * ms, "ms_per_prompt": ms}]} for ms in (90, 120, 95)]
    forward = median_forward(runs)
    assert forward["rounds"] == 3
    assert forward["batches"][0] == {"batch": 1, "ms_per_batch": 95, "ms_per_prompt": 95,
                                     "ms_per_prompt_rounds": [90, 120, 95]}
    assert forward["batches"][1]["ms_per_batch"] == 760
