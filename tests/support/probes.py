"""Probe files for tests: constant estimates (zero weights, a bias) that match a given scorer."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from router.probe import Probe, save_probe, scorer_block
from router.scorer.recipe import ScorerInfo


def constant_probe(info: ScorerInfo, p: float) -> Probe:
    d = info.feature_dim
    return Probe(np.zeros(d), np.ones(d), np.zeros(d), bias=math.log(p / (1 - p)), scorer=scorer_block(info))


def write_constant_probes(folder: Path, info: ScorerInfo, estimates: dict[str, float]) -> dict[str, Path]:
    return {name: save_probe(constant_probe(info, p), folder / f"{name}.json") for name, p in estimates.items()}
