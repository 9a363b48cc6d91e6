"""Probe files for tests: constant estimates (zero weights, a bias) that match a given scorer; prompts to fit text
features on; a config for ``python -m probes`` with two backends."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from router.probe import Probe, save_probe, scorer_block
from router.scorer.recipe import ScorerInfo

TEXTS = [
    "What is 2 + 2? Let's think step by step.",
    "A train leaves at 3 pm and travels 60 miles per hour. How far has it gone by 5 pm?",
    "Find the sum of all real x with x^2 - 5x + 6 = 0.",
    "How many ways can 5 books be arranged on a shelf? Think step by step.",
    "If a train travels 60 miles, how many hours at 30 miles per hour?",
]
"""Maths prompts, some sharing words, that the unit tests fit text features (TF-IDF) on."""


def constant_probe(info: ScorerInfo, p: float) -> Probe:
    d = info.feature_dim
    return Probe(np.zeros(d), np.ones(d), np.zeros(d), bias=math.log(p / (1 - p)), scorer=scorer_block(info))


def write_constant_probes(folder: Path, info: ScorerInfo, estimates: dict[str, float]) -> dict[str, Path]:
    return {name: save_probe(constant_probe(info, p), folder / f"{name}.json") for name, p in estimates.items()}


REAL_MODEL = Path(__file__).resolve().parents[2] / ".cache" / "SmolLM2-135M-Instruct"
SMALL_MODEL, BIG_MODEL = "Qwen/Qwen2.5-Math-1.5B-Instruct", "Qwen/Qwen2.5-Math-7B-Instruct"


def two_backend_config(folder: Path, extra: str = "", *, model: str | Path = REAL_MODEL, small: str = SMALL_MODEL,
                       big: str = BIG_MODEL, threshold: float = 0.85) -> str:
    """A config for ``python -m probes`` with the scorer ``model`` (the real one by default) cut after two layers:
    backends small and big (the labels of models ``small`` and ``big``: the Qwen2.5-Math models' by default), their
    probes under ``probes/``, ``threshold``; ``extra`` appended as is (under ``policy:`` if indented)."""
    return f"""\
scorer:
  model: {model}
  layers: [2]
  pooling: last
  cache_dir: {folder / "cache"}
backends:
  - name: small
    base_url: http://127.0.0.1:9/v1
    model: {small}
    input_cost_per_mtok: 0.1
    output_cost_per_mtok: 0.2
    probe: probes/small.json
  - name: big
    base_url: http://127.0.0.1:9/v1
    model: {big}
    input_cost_per_mtok: 0.4
    output_cost_per_mtok: 0.8
    probe: probes/big.json
policy:
  threshold: {threshold}   # keep me
{extra}"""
