"""Datasets for probes: JSONL, one question a line, with labels per served model where known."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from router import BackendConfig, request_cost


@dataclass(frozen=True)
class Dataset:
    path: Path
    records: list[dict[str, Any]]
    parent: Dataset | None = None  # for a subset: the whole file, whose cached features it reads (by ``rows``)
    rows: tuple[int, ...] = ()  # for a subset: its rows in ``parent``

    def subset(self, rows: Sequence[int]) -> Dataset:
        """These rows of the data (features are read from the whole file's cache, not extracted again)."""
        base = self.parent or self
        base_rows = tuple(self.rows[i] for i in rows) if self.parent is not None else tuple(int(i) for i in rows)
        return Dataset(self.path, [base.records[i] for i in base_rows], base, base_rows)

    def where(self, conditions: Mapping[str, Sequence[str]]) -> Dataset:
        """The questions whose field ``k`` (as text) is one of ``conditions[k]``, for every ``k``."""
        rows = [i for i, r in enumerate(self.records)
                if all(str(r.get(k)) in {str(v) for v in vs} for k, vs in conditions.items())]
        if not rows:
            raise ValueError(f"{self.path}: no question has {dict(conditions)}")
        return self.subset(rows)

    @property
    def questions(self) -> list[str]:
        return [r["question"] for r in self.records]

    def conversations(self) -> list[list[dict[str, str]]]:
        """What the gateway's scorer would read for each question sent as one user message."""
        return [[{"role": "user", "content": q}] for q in self.questions]

    def digest(self) -> str:
        return hashlib.sha256("\x1e".join(self.questions).encode()).hexdigest()[:16]

    def labels(self, model: str) -> np.ndarray:
        """0/1 correctness of ``model`` on every question; KeyError if the data has no labels for it."""
        missing = [i for i, r in enumerate(self.records) if model not in (r.get("correct") or {})]
        if missing:
            raise KeyError(f"{self.path}: no label for {model!r} on {len(missing)} of {len(self.records)} questions")
        return np.array([int(r["correct"][model]) for r in self.records], dtype=np.int64)

    def training_labels(self, key: str) -> np.ndarray:
        """A label set a probe may learn from: ``key``'s 0/1 correctness, or, where ``key`` names a run in
        ``success_rate`` (k sampled answers a question, e.g. ``Qwen/Qwen2.5-Math-1.5B-Instruct@k50_T0.6``), the
        fraction right, a graded label that trains as that share of a success and the rest of a failure. The
        metrics, C and Platt always use 0/1 correctness (``labels``)."""
        if all(key in (r.get("correct") or {}) for r in self.records):
            return self.labels(key)
        rates = [(r.get("success_rate") or {}).get(key) for r in self.records]
        missing = sum(v is None for v in rates)
        if missing:
            raise KeyError(f"{self.path}: neither a label nor a success rate for {key!r} on {missing} of "
                           f"{len(self.records)} questions")
        return np.array(rates, dtype=np.float64)

    def label_sets(self) -> list[str]:
        """Every label set a probe may learn from that all questions have: each model's 0/1 correctness, then
        each success rate (``training_labels``), sorted within each."""
        def common(field: str) -> list[str]:
            return sorted(set.intersection(*(set(r.get(field) or {}) for r in self.records)))

        correct = common("correct")
        return [*correct, *(k for k in common("success_rate") if k not in correct)]

    def reference(self, model: str) -> np.ndarray | None:
        """Reference probabilities (``paper_probe_p``) for ``model``, when every record has one."""
        values = [(r.get("paper_probe_p") or {}).get(model) for r in self.records]
        return None if any(v is None for v in values) else np.array(values, dtype=np.float64)


def load_dataset(path: str | Path) -> Dataset:
    path = Path(path)
    records = []
    with path.open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON: {e}") from e
            if not isinstance(record, dict) or not isinstance(record.get("question"), str):
                raise ValueError(f"{path}:{n}: each line needs a string field 'question'")
            records.append(record)
    if not records:
        raise ValueError(f"{path}: no questions")
    return Dataset(path, records)


def estimate_costs(
    dataset: Dataset, backend: BackendConfig, prompt_tokens: np.ndarray, output_tokens: int,
) -> tuple[np.ndarray, str]:
    """Per-question cost of calling ``backend``: the data's measured ``cost[model]`` where every record has
    one, else prompt tokens (the scorer's count) and ``output_tokens`` at the backend's prices."""
    measured = [(r.get("cost") or {}).get(backend.model) for r in dataset.records]
    if all(v is not None for v in measured):
        return np.array(measured, dtype=np.float64), "measured"
    est = request_cost(backend.input_cost_per_mtok, backend.output_cost_per_mtok, prompt_tokens, output_tokens)
    return np.asarray(est, dtype=np.float64), f"estimated: scorer-token prompt length + {output_tokens} output tokens"
