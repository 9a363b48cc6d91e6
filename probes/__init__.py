"""probes: the offline half of probe-router. Label a pool's answers, extract the scorer's features through the
gateway's own feature function, train one probe per backend, evaluate them honestly, calibrate the threshold.

``python -m probes --help`` is the command line; this is the public face for scripts and research code. Every name
is imported when first used (scikit-learn and matplotlib load only then).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from probes.calibrate import Choice, choose_threshold
    from probes.cli import main
    from probes.data import Dataset, load_dataset
    from probes.evaluate import evaluate, labelled_backends, pool_estimates, shared_keys
    from probes.extract import cache_path, extract_features, probe_inputs
    from probes.fit import (
        DEFAULT_CS,
        Inputs,
        SparseLogistic,
        StandardisedLogistic,
        fit_calibrated,
        fit_platt,
        fit_probe,
        fit_text_features,
        held_out,
        inner_cv,
        nested_oof,
        probe_model,
        stack_as_weights,
    )
    from probes.metrics import Frontier, apgr, auroc, bootstrap_ci, brier, ece, routing_frontier
    from probes.recipes import Recipe, columns
    from probes.replay import Part, Stream, load_stream, replay
    from probes.train import train_probes

_EXPORTS = {
    "Choice": "calibrate", "choose_threshold": "calibrate",
    "main": "cli",
    "Dataset": "data", "load_dataset": "data",
    "evaluate": "evaluate", "held_out": "fit", "labelled_backends": "evaluate", "pool_estimates": "evaluate",
    "shared_keys": "evaluate",
    "cache_path": "extract", "extract_features": "extract", "probe_inputs": "extract",
    "DEFAULT_CS": "fit", "Inputs": "fit", "SparseLogistic": "fit", "StandardisedLogistic": "fit",
    "fit_calibrated": "fit", "fit_platt": "fit", "fit_probe": "fit", "fit_text_features": "fit", "inner_cv": "fit",
    "nested_oof": "fit", "probe_model": "fit", "stack_as_weights": "fit",
    "Frontier": "metrics", "apgr": "metrics", "auroc": "metrics", "bootstrap_ci": "metrics", "brier": "metrics",
    "ece": "metrics", "routing_frontier": "metrics",
    "Recipe": "recipes", "columns": "recipes",
    "Part": "replay", "Stream": "replay", "load_stream": "replay", "replay": "replay",
    "train_probes": "train",
}

__all__ = [
    "DEFAULT_CS",
    "Choice",
    "Dataset",
    "Frontier",
    "Inputs",
    "Part",
    "Recipe",
    "SparseLogistic",
    "StandardisedLogistic",
    "Stream",
    "apgr",
    "auroc",
    "bootstrap_ci",
    "brier",
    "cache_path",
    "choose_threshold",
    "columns",
    "ece",
    "evaluate",
    "extract_features",
    "fit_calibrated",
    "fit_platt",
    "fit_probe",
    "fit_text_features",
    "held_out",
    "inner_cv",
    "labelled_backends",
    "load_dataset",
    "load_stream",
    "main",
    "nested_oof",
    "pool_estimates",
    "probe_inputs",
    "probe_model",
    "replay",
    "routing_frontier",
    "shared_keys",
    "stack_as_weights",
    "train_probes",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'probes' has no attribute {name!r}")
    return getattr(importlib.import_module(f"probes.{module}"), name)
