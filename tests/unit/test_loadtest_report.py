"""The benchmark's arithmetic and its Markdown, on made-up results (the benchmark itself is ``make bench``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from loadtest.report import END, START, publish, table
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
    "routed c=16": {"routed": {**_cell(10, 1500), "mean_scorer_batch": 8.0, "scored_share": 1.0}},
}
ROOFLINE = {"gflop_per_prompt": 8.5, "transformers_gflop_per_prompt": 14.5, "prefix_tokens": 23,
            "mean_prompt_tokens": 106.7, "threads": 1, "matmul_rows": 670, "matmul_gflops": 350.0,
            "scorer_gflops": 250.0, "scorer_vs_limit": 0.714, "reference_threads": 2, "transformers_matmul_rows": 1100,
            "transformers_matmul_gflops": 700.0, "transformers_gflops": 230.0, "transformers_vs_limit": 0.329}
FORWARD = {"threads": 1, "dtype": "bfloat16", "layers": [15], "prompts": 32,
           "batches": [{"pass": "scorer", "batch": 1, "ms_per_batch": 95.0, "ms_per_prompt": 95.0},
                       {"pass": "scorer", "batch": 8, "ms_per_batch": 800.0, "ms_per_prompt": 100.0},
                       {"pass": "transformers", "batch": 8, "ms_per_batch": 2000.0, "ms_per_prompt": 250.0}],
           "roofline": ROOFLINE}


def test_derive_turns_the_scenarios_into_the_issues_ratios() -> None:
    t = derive(SCENARIOS, FORWARD)
    assert t["explicit_vs_floor_throughput"] == 0.95
    assert t["explicit_vs_litellm_throughput"] == 38.0
    assert t["explicit_vs_untuned_gc_throughput"] == 2.0
    assert t["gateway_added_p50_ms_c1"] == pytest.approx(0.5)
    assert t["scorer_ms_per_request_c1"] == 100.0 and t["scorer_vs_forward_b1"] == pytest.approx(100 / 95, abs=1e-3)
    assert t["scorer_ms_per_request_c16"] == 100.0 and t["scorer_vs_forward_b8"] == 1.0
    assert t["routed_c16_vs_transformers_b8"] == 2.5 and t["routed_c16_scored_share"] == 1.0
    assert t["scorer_p50_ms_c1"] == pytest.approx(94.4)
    assert "routed_c16_vs_transformers_recipe_b8" not in t  # the config reads the reference's blocks


def test_a_recipe_of_fewer_blocks_is_also_set_against_transformers_over_its_own_blocks() -> None:
    own = {"pass": "transformers-recipe", "batch": 8, "ms_per_batch": 800.0, "ms_per_prompt": 100.0}
    t = derive(SCENARIOS, {**FORWARD, "batches": [*FORWARD["batches"], own]})
    assert t["routed_c16_vs_transformers_b8"] == 2.5  # the reference stays transformers over blocks 1-15
    assert t["routed_c16_vs_transformers_recipe_b8"] == 1.0


def test_where_bf16_is_emulated_the_issues_bf16_reference_is_set_beside_the_scorers_dtype() -> None:
    emulated = {"pass": "transformers-bf16", "batch": 8, "ms_per_batch": 12000.0, "ms_per_prompt": 1500.0}
    t = derive(SCENARIOS, {**FORWARD, "dtype": "float32", "batches": [*FORWARD["batches"], emulated]})
    assert t["routed_c16_vs_transformers_b8"] == 2.5  # the target's reference: transformers in the scorer's dtype
    assert t["routed_c16_vs_transformers_bf16_b8"] == 15.0
    assert "routed_c16_vs_transformers_bf16_b8" not in derive(SCENARIOS, FORWARD)


def test_the_table_replaces_only_the_text_between_the_markers(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"# Benchmarks\n\nintro\n\n{START}\nold table\n{END}\n\nprose after\n")
    results = {"started": "2026-11-25T15:00:00+0000", "rounds": 5, "duration_s": 170.0,
               "machine": {"nproc": 2, "cpu": "AMD EPYC", "memory_gib": 23.5, "python": "3.11.7"},
               "scenarios": SCENARIOS, "forward_pass": FORWARD,
               "gc": {"tracked_objects": 424450, "full_collection_ms": 190.3, "full_collection_us_frozen": 2.1},
               "targets": derive(SCENARIOS, FORWARD)}
    publish(results, tmp_path / "latest.json", doc, START, END, table(results))
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nintro\n") and text.endswith("prose after\n") and "old table" not in text
    assert "| chat c=64 | probe-router, explicit backend, Python's default GC | 1,900 |" in text
    assert "| explicit path throughput / bare pass-through (c=64) | 0.95 | ≥ 0.90 | yes |" in text
    assert "| explicit path throughput / LiteLLM (c=64) | 38 | ≥ 25× | yes |" in text
    assert ("| routed prompts/s through HTTP (c=16) / transformers' padded pass (blocks 1-15), batch 8 | 2.5 | ≥ 3.0 "
            "| no |") in text
    assert "at 250 GFLOP/s, 71% of this machine's 350 GFLOP/s" in text
    assert "424,450 tracked objects; a full collection takes 190.3 ms, 2.1 µs after `gc.freeze()`" in text


def test_the_forward_pass_is_the_median_of_its_rounds() -> None:
    runs = [{**FORWARD, "batches": [{"pass": "scorer", "batch": 1, "ms_per_batch": ms, "ms_per_prompt": ms},
                                    {"pass": "scorer", "batch": 8, "ms_per_batch": 8 * ms, "ms_per_prompt": ms},
                                    {"pass": "transformers", "batch": 8, "ms_per_batch": 16 * ms,
                                     "ms_per_prompt": 2 * ms}],
             "roofline": {**ROOFLINE, "scorer_gflops": 1000 / ms}} for ms in (90, 120, 95)]
    forward = median_forward(runs)
    assert forward["rounds"] == 3
    assert forward["batches"][0] == {"pass": "scorer", "batch": 1, "ms_per_batch": 95, "ms_per_prompt": 95,
                                     "ms_per_prompt_rounds": [90, 120, 95]}
    assert forward["batches"][1]["ms_per_batch"] == 760
    assert forward["batches"][2]["ms_per_prompt"] == 190
    assert forward["roofline"]["scorer_gflops"] == 1000 / 95  # the roofline of the median round


def test_the_roofline_counts_what_each_pass_computes(tiny_extractor) -> None:  # type: ignore[no-untyped-def]
    from loadtest.roofline import Shapes, packed_flops, padded_flops

    shapes = Shapes(tiny_extractor)  # 4 heads of 8, 2 kv heads, hidden 32, intermediate 64, depth 2
    assert shapes.block_macs(1) == 32 * 64 + 32 * 32 + 32 * 128 + 64 * 32
    same = [[1] * 10, [2] * 10]
    assert packed_flops(shapes, same, prefix=0, last_only=False) == padded_flops(shapes, [same])
    # padding: the short prompt costs as much as the long one
    mixed = [[1] * 4, [2] * 10]
    assert padded_flops(shapes, [mixed]) == padded_flops(shapes, [[[1] * 10, [2] * 10]])
    assert packed_flops(shapes, mixed, prefix=0, last_only=False) < padded_flops(shapes, [mixed])
    # the shared prefix is not recomputed: only the tokens after it run, attending to all
    with_prefix = packed_flops(shapes, [[1] * 10], prefix=4, last_only=False)
    assert with_prefix == 2 * 2 * (shapes.block_macs(6) + shapes.attention_macs(6, 10))
