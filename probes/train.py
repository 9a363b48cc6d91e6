"""``python -m probes train``: fit one probe per backend of a config on a labelled dataset and write them where
the config says the gateway will find them.

With a sweep, the scorer recipe (layers × pooling, shared by every backend since the gateway runs one scorer)
is chosen first by inner cross-validation: the best mean AUROC over the backends.

A backend whose own labels hold too few successes or failures to learn from, or whose probe's out-of-fold AUROC
has a 95% interval that reaches 0.5, gets no probe (``probes.guards``) unless ``force`` is set; the result says
why, per backend."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import brier_score_loss, roc_auc_score
from tqdm import tqdm

from probes.cascade import CascadeTraining, StageInputs, add_margins, cascade_inputs, stage_probes
from probes.data import Dataset
from probes.extract import extract_features, probe_inputs
from probes.fit import DEFAULT_CS, fit_probe, inner_cv, probe_logits, probe_model, recalibrated
from probes.guards import Chance, auroc_check, label_shortfall
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
    train_keys: dict[str, list[str]] | None = None, progress: bool = True, force: bool = False,
) -> SweepOutcome:
    """The recipe with the best inner-CV AUROC averaged over the backends (ties: the first listed); backends with
    too few of an outcome to train on take no part unless ``force``."""
    labels = backend_labels(settings, dataset, label_keys or {}, train_keys or {})
    if not force:
        labels = {name: v for name, v in labels.items() if label_shortfall(name, v[1], folds) is None}
    if not labels:
        raise ValueError("no backend of the config has enough labels in the data to choose a recipe on")
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


@dataclass
class TrainResult:
    """What ``train_probes`` did, per backend."""

    written: dict[str, Path] = field(default_factory=dict)  # backend: its probe file
    refused: dict[str, str] = field(default_factory=dict)  # backend: why it has no probe, in plain words
    forced: dict[str, list[str]] = field(default_factory=dict)  # backend: why it would have been refused (force)
    auroc: dict[str, Chance] = field(default_factory=dict)  # backend: its out-of-fold AUROC and interval


def train_probes(
    settings: Settings, dataset: Dataset, *, out_dir: Path | None = None, folds: int = 5, seed: int = 0,
    cs: tuple[Any, ...] | None = None, label_keys: dict[str, str] | None = None,
    train_keys: dict[str, list[str]] | None = None, extra_training: dict[str, object] | None = None,
    text: str = "none", calibration: Dataset | None = None, progress: bool = True,
    cascade: CascadeTraining | None = None, force: bool = False, rounds: int = 1000,
) -> TrainResult:
    """Train a probe for every backend that has labels in ``dataset`` and write it where the config says (or to
    ``out_dir``).

    ``train_keys`` gives, per backend, the label keys whose rows are stacked to train its weights (default: its
    own); C, Platt and the reported metrics always use its own labels (``label_keys``, default its model).
    ``text`` adds text features of the prompt beside the activations (see ``probes.fit.probe_model``). With
    ``calibration``, Platt is re-fitted on that data's labels (the weights stay those learnt on ``dataset``).

    With ``cascade``, each file also carries the backend's cascade stages and the margins they decide with
    (``probes.cascade``), chosen for the config's policy on the held-out estimates of every trained backend.

    A backend's probe is refused (not written) when its own labels hold fewer than ``min_per_class(folds)``
    successes or failures (checked before any fitting), or when the nested out-of-fold AUROC's bootstrap 95%
    interval (``rounds`` resamples) reaches 0.5; with ``force`` it is written anyway and the reason kept in
    ``forced``."""
    model, grid = probe_model(text, cs)
    labels = backend_labels(settings, dataset, label_keys or {}, train_keys or {})
    result = TrainResult()

    def refuse(name: str, why: str) -> bool:
        """Record why ``name``'s probe falls short; True when it is refused (no ``force``)."""
        if force:
            result.forced.setdefault(name, []).append(why)
        else:
            result.refused[name] = why
        return not force

    for name, (_, y, _, _) in labels.items():
        if (short := label_shortfall(name, y, folds)) is not None:
            refuse(name, short.message())
    extracted: dict[str, tuple[Any, Any, Scorer]] = {}  # by scorer: a self-probe reads its backend's own
    stage_inputs: dict[str, StageInputs] = {}
    held: dict[str, dict[str, np.ndarray]] = {}  # for the cascade's margins: per backend, each model's estimates
    costs: dict[str, np.ndarray] = {}
    for backend in settings.backends:
        if backend.name not in labels or backend.name in result.refused:
            continue
        target = (out_dir / f"{backend.name}.json") if out_dir else backend.probe
        if target is None:
            log.warning("skipping backend %s: it has no probe path and no --out was given", backend.name)
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
        try:
            fitted = fit_probe(x, y, cs=grid, folds=folds, seed=seed, train_labels=ys, model=model)
        except ValueError as e:  # e.g. a fold left with one outcome under force: nothing to fit
            result.refused[backend.name] = f"{backend.name}: no probe could be fitted on these labels ({e})"
            continue
        chance = result.auroc[backend.name] = auroc_check(backend.name, y, fitted.oof_probability, rounds=rounds,
                                                          seed=seed)
        if not chance.ok and refuse(backend.name, chance.message()):
            continue
        probe = fitted.probe
        metrics: dict[str, Any] = {
            "oof_auroc": round(fitted.oof_auroc, 4),
            "oof_auroc_ci95": [round(chance.low, 4), round(chance.high, 4)],
            "oof_brier": round(float(brier_score_loss(y, fitted.oof_probability)), 4),
            "base_rate": round(float(np.mean(y)), 4),
            "note": "nested out-of-fold on the training data: C and Platt re-chosen inside each outer fold",
        }
        if backend.name in result.forced:
            metrics["forced"] = result.forced[backend.name]  # written under --force despite these
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
        result.written[backend.name] = save_probe(probe, target)
        log.debug("%s: out-of-fold AUROC %.3f [%.3f, %.3f] (C=%s) → %s", backend.name, fitted.oof_auroc,
                  chance.low, chance.high, fitted.c, target)
    if cascade is not None and held:
        add_margins(settings, result.written, held, costs, cascade, data=(calibration or dataset).path.name)
    return result


def calibration_summary(probe: Probe, x: Any, y: np.ndarray, data: Dataset, y_train: np.ndarray) -> dict[str, Any]:
    p = probe.predict_logits(probe_logits(probe, x))
    return {"data": data.path.name, "data_sha256_16": data.digest(), "n": len(y),
            "base_rate": round(float(y.mean()), 4), "training_base_rate": round(float(y_train.mean()), 4),
            "auroc": round(float(roc_auc_score(y, p)), 4) if len(np.unique(y)) > 1 else None,
            "brier": round(float(brier_score_loss(y, p)), 4)}
