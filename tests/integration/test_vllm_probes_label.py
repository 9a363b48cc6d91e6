"""``probes label`` on a small sample against the real vLLM CPU servers (SmolLM2 stand-ins)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from probes.data import load_dataset
from probes.label import label_dataset, read_results, results_path
from tests.conftest import ROOT
from tests.integration.conftest import Pool

pytestmark = pytest.mark.integration

SAMPLE = 3


def test_label_grades_and_costs_real_answers(vllm_pool: Pool, tmp_path: Path) -> None:
    dataset = load_dataset(ROOT / "data" / "gsm8k_test_qwen25math.jsonl")
    out = tmp_path / "labelled.jsonl"
    asyncio.run(label_dataset(vllm_pool.settings, dataset, out, limit=SAMPLE, max_tokens=48, concurrency=2,
                              progress=False))
    rows = read_results(results_path(out))
    assert len(rows) == SAMPLE * len(vllm_pool.settings.backends)
    for row in rows:
        backend = vllm_pool.settings.backend(row["backend"])
        assert row["correct"] in (0, 1) and row["prompt_tokens"] > 0 and 0 < row["completion_tokens"] <= 48
        expected = (row["prompt_tokens"] * backend.input_cost_per_mtok
                    + row["completion_tokens"] * backend.output_cost_per_mtok) / 1e6
        assert row["cost"] == pytest.approx(expected)
        assert row["completion"]  # the stand-in's real text, graded against the gold answer
    labelled = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(labelled) == SAMPLE
    for record in labelled:
        assert set(record["correct"]) >= {b.model for b in vllm_pool.settings.backends}
    # Asked again, nothing is redone: every (question, backend) pair is already in the log.
    asyncio.run(label_dataset(vllm_pool.settings, dataset, out, limit=SAMPLE, max_tokens=48, concurrency=2,
                              progress=False))
    assert len(read_results(results_path(out))) == len(rows)
