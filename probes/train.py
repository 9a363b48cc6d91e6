"""``python -m probes train``: fit one probe per backend of a config on a labelled dataset and write them where
the config says the gateway will find them.

With a sweep, the scorer recipe (layers × pooling, shared by every backend since the gateway runs one scorer)
is chosen first by inner cross-validation: the best mean AUROC over the backends."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import brier_score_loss, roc_auc_score
from tqdm import tqdm

from probes.cascade import CascadeTraining, StageInputs, add_margins, cascade_inputs, stage_probes
from probes.data import Dataset
from probes.extract import extract_features, probe_inputs
from probes.fit import DEFAULT_CS, fit_probe, inner_cv, probe_logits, probe_model, recalibrated
from probes.recipes import Recipe, columns
from router import Probe, Settings, save_probe, scorer_block
from router.scorer import Scorer

log = logging.getLogger(__name__)


def backend_labels(
    settings: Settings, dataset: Dataset, label_keys: dict[str, str], train_keys: dict[str, list[str]],
) -> dict[str, tuple[str, np.ndarray, list[str], list[np.ndarray]]]:
    """{backend: (target key, target labels, training keys, training label sets)} for backends with labels."""
    out = {}
    for backend in settings.backends:
        key = label_keys.get(backend.name, backend.model)
        try:
            y = dataset.labels(key)
            keys = train_keys.get(backend.name, [key])
            ys = [dataset.training_labels(k) for k in keys]
        except KeyError as e:
            log.warning("skipping backend %s: %s", backend.name, e)
            continue
        out[backend.name] = (key, y, keys, ys)
    return out


@dataclass(frozen=True)
class SweepOutcome:
    recipe: Recipe
    table: list[dict[str, object]]  # per recipe: mean inner AUROC per backend and overall


def sweep_recipes(
    settings: Settings, dataset: Dataset, recipes: Sequence[Recipe], *, folds: int = 5, seed: int = 0,
    cs: Sequence[float] = DEFAULT_CS, label_keys: dict[str, str] | None = None,
    train_keys: dict[str, list[str]] | None = None, progress: bool = True,
) -> SweepOutcome:
    """The recipe with the best inner-CV AUROC averaged over the backends (ties: the first listed)."""
    labels = backend_labels(settings, dataset, label_keys or {}, train_keys or {})
    if not labels:
        raise ValueError("no backend of the config has labels in the data")
    union = sorted({layer for r in recipes for layer in r.layers})
    cfg = settings.scorer.model_copy(update={"layers": union, "pooling": "last+mean"})
    features, extractor = extract_features(cfg, dataset, progress=progress)
    table: list[dict[str, object]] = []
    best: tuple[float, Recipe] | None = None
    for recipe in tqdm(recipes, desc="recipe sweep", unit="recipe", disable=not progress):
        x = features[:, columns(recipe, union, "last+mean", extractor.info.hidden_size)]
        row: dict[str, object] = {"recipe": recipe.as_dict()}
        scores = []
        for name, (_, y, _, ys) in labels.items():
            inner = inner_cv(x, ys, y, cs=cs, folds=folds, seed=seed)
            row[name] = {"inner_auroc": round(inner.best_auroc, 4), "C": inner.c}
            scores.append(inner.best_auroc)
        row["mean_inner_auroc"] = round(float(np.mean(scores)), 4)
        table.append(row)
        log.info("%s: mean inner AUROC %.4f", recipe, np.mean(scores))
        if best is None or np.mean(scores) > best[0] + 1e-12:
            best = (float(np.mean(scores)), recipe)
    assert best is not None
    return SweepOutcome(best[1], table)


def train_probes(
    settings: Settings, dataset: Dataset, *, out_dir: Path | None = None, folds: int = 5, seed: int = 0,
    cs: tuple[Any, ...] | None = None, label_keys: dict[str, str] | None = None,
    train_keys: dict[str, list[str]] | None = None, extra_training: dict[str, object] | None = None,
    text: str = "none", calibration: Dataset | None = None, progress: bool = True,
    cascade: CascadeTraining | None = None,
) -> dict[str, Path]:
    """Train a probe for every backend that has labels in ``dataset``; return {backend: probe path}.

    ``train_keys`` gives, per backend, the label keys whose rows are stacked to train its weights (default: its
    own); C, Platt and the reported metrics always use its own labels (``label_keys``, default its model).
    ``text`` adds text features of the prompt beside the activations (see ``probes.fit.probe_model``). With
    ``calibration``, Platt is re-fitted on that data's labels (the weights stay those learnt on ``dataset``).
    With ``cascade``, each file also carries the backend's cascade stages and the margins they decide with
    (``probes.cascade``), chosen for the config's policy on the held-out estimates of every trained backend."""
    model, grid = probe_model(text, cs)
    labels = backend_labels(settings, dataset, label_keys or {}, train_keys or {})
    extracted: dict[str, tuple[Any, Any, Scorer]] = {}  # by scorer: a self-probe reads its backend's own
    stage_inputs: dict[str, StageInputs] = {}
    written: dict[str, Path] = {}
    held: dict[str, dict[str, np.ndarray]] = {}  # for the cascade's margins: per backend, each model's estimates
    costs: dict[str, np.ndarray] = {}
    for backend in settings.backends:
        if backend.name not in labels:
            continue
        cfg = settings.scorer_for(backend)
        if (scorer_key := cfg.model_dump_json()) not in extracted:
            x, extractor = probe_inputs(cfg, dataset, text, progress=progress)
            x_cal = None if calibration is None else probe_inputs(cfg, calibration, text, scorer=extractor,
                                                                  progress=progress)[0]
            extracted[scorer_key] = (x, x_cal, extractor)
            if cascade is not None:
                stage_inputs[scorer_key] = cascade_inputs(cfg, dataset, calibration, text, cascade, extractor,
                                                          progress=progress)
        x, x_cal, extractor = extracted[scorer_key]
        key, y, keys, ys = labels[backend.name]
        target = (out_dir / f"{backend.name}.json") if out_dir else backend.probe
        if target is None:
            log.warning("skipping backend %s: it has no probe path and no --out was given", backend.name)
            continue
        fitted = fit_probe(x, y, cs=grid, folds=folds, seed=seed, train_labels=ys, model=model)
        probe = fitted.probe
        metrics: dict[str, Any] = {
            "oof_auroc": round(fitted.oof_auroc, 4),
            "oof_brier": round(float(brier_score_loss(y, fitted.oof_probability)), 4),
            "base_rate": round(float(np.mean(y)), 4),
            "note": "nested out-of-fold on the training data: C and Platt re-chosen inside each outer fold",
        }
        if calibration is not None:
            y_cal = calibration.labels(key)
            probe = recalibrated(probe, probe_logits(probe, x_cal), y_cal)
            metrics["calibration"] = calibration_summary(probe, x_cal, y_cal, calibration, y)
        probe = replace(
            probe,
            scorer=scorer_block(extractor.info),
            training={
                "data": dataset.path.name,
                "data_sha256_16": dataset.digest(),
                "label": key,
                "trained_on": keys,
                "text_features": text,
                "n": len(y),
                "positives": int(y.sum()),
                "C": list(fitted.c) if isinstance(fitted.c, tuple) else fitted.c,
                "C_grid": [list(c) if isinstance(c, tuple) else c for c in grid],
                "folds": folds,
                "seed": seed,
                "trained_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                **(extra_training or {}),
            },
            metrics=metrics,
        )
        if cascade is not None:
            staged = stage_inputs[scorer_key]
            stages, estimates = stage_probes(
                staged.train, staged.early_block, ys, y, text=text, model=model, cs=grid, folds=folds, seed=seed,
                calibration=None if calibration is None else (staged.calibration, calibration.labels(key)))
            probe = replace(probe, stages=stages)
            full = (fitted.inner_probability if calibration is None
                    else probe.predict_logits(probe_logits(probe, x_cal)))
            held[backend.name] = {"full": full, **estimates}
            costs[backend.name] = staged.cost(backend, settings.policy.expected_output_tokens)
        written[backend.name] = save_probe(probe, target)
        log.info("%s: out-of-fold AUROC %.3f (C=%s) → %s", backend.name, fitted.oof_auroc, fitted.c, target)
    if cascade is not None and held:
        add_margins(settings, written, held, costs, cascade, data=(calibration or dataset).path.name)
    return written


def calibration_summary(probe: Probe, x: Any, y: np.ndarray, data: Dataset, y_train: np.ndarray) -> dict[str, Any]:
    p = probe.predict_logits(probe_logits(probe, x))
    return {"data": data.path.name, "data_sha256_16": data.digest(), "n": len(y),
            "base_rate": round(float(y.mean()), 4), "training_base_rate": round(float(y_train.mean()), 4),
            "auroc": round(float(roc_auc_score(y, p)), 4) if len(np.unique(y)) > 1 else None,
            "brier": round(float(brier_score_loss(y, p)), 4)}
