"""The busy-tenants benchmark's harness (loadtest/busy_tenants.py) on the tiny test model: every request of every
key is scored and timed, each variant keeps its keys apart or together as it says, and switching the flooding-key
rule off for one variant leaves it on for whatever runs next in the process."""

from __future__ import annotations

import asyncio

import pytest

from loadtest.busy_tenants import measure, medians
from loadtest.prompts import DATA
from router.config import ScorerConfig
from router.scorer import batcher


@pytest.mark.parametrize("variant", ["keys", "keys-no-rule", "one-key"])
def test_every_request_of_every_key_is_scored_and_timed(tiny_scorer_cfg: ScorerConfig, variant: str) -> None:
    contended_s = batcher.CONTENDED_S
    out = asyncio.run(measure(tiny_scorer_cfg, variant, DATA, keys=2,
                              concurrency=2, requests=6))
    assert contended_s == batcher.CONTENDED_S  # restored after the variant
    assert set(out["per_key_s"]) == {"key-0", "key-1"}
    assert all(q["p50"] is not None and q["p50"] <= q["p90"] for q in out["per_key_s"].values())
    assert out["scored"] == 12
    assert out["prompts_per_s"] == pytest.approx(12 / out["wall_s"], rel=0.02)
    # every prompt of the load went through a pass (whole, or as chunks: a chunked prompt counts once here)
    assert out["mean_prompts_a_pass"] * out["passes"] == pytest.approx(12, abs=0.1)
    summary = medians([out, out])
    assert summary["prompts_per_s"] == out["prompts_per_s"]
    assert summary["p50_s"] == {k: v["p50"] for k, v in out["per_key_s"].items()}
