"""``python -m probes train``: fit one probe per backend of a config on a labelled dataset and write them where
the config says the gateway will find them."""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
from sklearn.metrics import brier_score_loss

from probes.data import Dataset
from probes.extract import extract_features
from probes.fit import DEFAULT_CS, fit_probe
from router.config import Settings
from router.probe import save_probe, scorer_block

log = logging.getLogger(__name__)


def train_probes(
    settings: Settings, dataset: Dataset, *, out_dir: Path | None = None, folds: int = 5, seed: int = 0,
    cs: tuple[float, ...] = DEFAULT_CS, label_keys: dict[str, str] | None = None,
) -> dict[str, Path]:
    """Train a probe for every backend that has labels in ``dataset``; return {backend: probe path}."""
    features, extractor = extract_features(settings.scorer, dataset)
    label_keys = label_keys or {}
    written: dict[str, Path] = {}
    for backend in settings.backends:
        key = label_keys.get(backend.name, backend.model)
        try:
            y = dataset.labels(key)
        except KeyError as e:
            log.warning("skipping backend %s: %s", backend.name, e)
            continue
        target = (out_dir / f"{backend.name}.json") if out_dir else backend.probe
        if target is None:
            log.warning("skipping backend %s: it has no probe path and no --out was given", backend.name)
            continue
        fitted = fit_probe(features, y, cs=cs, folds=folds, seed=seed)
        probe = replace(
            fitted.probe,
            scorer=scorer_block(extractor.info),
            training={
                "data": dataset.path.name,
                "data_sha256_16": dataset.digest(),
                "label": key,
                "n": len(y),
                "positives": int(y.sum()),
                "C": fitted.c,
                "C_grid": list(cs),
                "folds": folds,
                "seed": seed,
                "trained_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            },
            metrics={
                "oof_auroc": round(fitted.oof_auroc, 4),
                "oof_brier": round(float(brier_score_loss(y, fitted.oof_probability)), 4),
                "base_rate": round(float(np.mean(y)), 4),
                "note": "out-of-fold on the training data, C re-chosen inside each fold (nested CV)",
            },
        )
        written[backend.name] = save_probe(probe, target)
        log.info("%s: out-of-fold AUROC %.3f (C=%g) → %s", backend.name, fitted.oof_auroc, fitted.c, target)
    return written
