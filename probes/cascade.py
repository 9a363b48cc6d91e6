"""The cascade's decision side, offline: its stage models, the margins they decide with, and how well a cascade
routes held-out data against the full probes.

A cascade decides a request with the first stage whose decision is clear, ``text`` (the prompt's text features
alone: no scorer pass), then ``early`` (the scorer's features at a shallow block: the pass stops there), else the
full probes. A stage's decision is clear when its ``router.policy.decision_radius`` exceeds the stage's margin:
estimates anywhere within the margin of the stage's would send the request to the same backend.

The margins are chosen on held-out estimates of the training rows (each model's inner cross-validation, C and
Platt as the shipped model's) for one policy: the smallest margins whose cascade agrees with the full probes'
decisions on at least ``agreement`` of the rows, and among those the ones that run the fewest scorer blocks (a
request decided by ``text`` runs none, by ``early`` the blocks up to it, by the full probes all of them). So one
stage may take more of the disagreement budget than another where that saves more passes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from probes.fit import Calibrated, TextOnly, fit_calibrated, probe_model
from probes.pool import threshold_radius, utility_radius
from router import PolicyConfig, Rule, ScorerConfig, Settings

log = logging.getLogger(__name__)

DEFAULT_AGREEMENT = 0.99
AGREEMENT_LEVELS = (0.95, 0.98, 0.99, 0.995, 0.999)  # the single-stage curves stored beside the chosen margins
THRESHOLD_GRID = tuple(round(0.01 * i, 2) for i in range(101))  # margins stored for these thresholds too
MAX_CANDIDATES = 128  # first-stage margins tried when choosing two at once
_SMALLEST = 1e-9  # the least positive margin (0 means "decide every request")


def policy_rule(policy: PolicyConfig, threshold: float | None = None) -> Rule:
    """The rule the gateway decides with under ``policy`` (``threshold`` overriding the configured one)."""
    return Rule(policy.mode, policy.threshold if threshold is None else threshold, policy.cost_weight,
                policy.fallback, policy.margin)


def decisions(p: np.ndarray, cost: np.ndarray, names: Sequence[str], rule: Rule) -> tuple[np.ndarray, np.ndarray]:
    """Every row's decision (backend index) under ``rule`` and its radius (``router.policy.decision_radius``)."""
    fallback = list(names).index(rule.fallback) if rule.fallback in names else None
    if rule.mode == "utility":
        return utility_radius(p, cost, names, rule.cost_weight, fallback, rule.margin)
    return threshold_radius(p, cost, names, rule.threshold, fallback)


def route(full: np.ndarray, stages: Mapping[str, tuple[np.ndarray, np.ndarray]], margins: Mapping[str, float | None]
          ) -> tuple[np.ndarray, np.ndarray]:
    """The cascade's decision per row and the stage that made it (index into ``stages``; ``len(stages)``: the full
    probes). ``stages``: (decision, radius) per stage, in the order asked; a stage decides a row when its margin
    is not None and is 0 or below the radius (``router.policy.clear_decision``)."""
    choice = full.copy()
    by = np.full(len(full), len(stages))
    open_rows = np.ones(len(full), dtype=bool)
    for i, (name, (decision, radius)) in enumerate(stages.items()):
        m = margins.get(name)
        if m is None:
            continue
        take = open_rows & ((m <= 0) | (radius > m))
        choice[take] = decision[take]
        by[take] = i
        open_rows &= ~take
    return choice, by


def _smallest_margin(disagreeing: np.ndarray, budget: int) -> float:
    """The smallest margin that lets at most ``budget`` of the rows whose radii are ``disagreeing`` through."""
    if len(disagreeing) <= budget:
        return 0.0
    k = len(disagreeing) - 1 - budget  # the (budget + 1)-th largest
    return max(float(np.partition(disagreeing, k)[k]), _SMALLEST)


@dataclass(frozen=True)
class MarginChoice:
    margins: dict[str, float]  # per stage, in the order asked
    agreement: float  # of the cascade's decisions with the full probes', on the rows chosen on
    decided: dict[str, float]  # share of rows each stage decides; "full": the rest
    compute: float  # mean scorer blocks run, as a share of the full pass
    n: int

    def as_dict(self) -> dict[str, Any]:
        return {"margins": {s: round(m, 6) for s, m in self.margins.items()}, "agreement": round(self.agreement, 4),
                "decided": {s: round(v, 4) for s, v in self.decided.items()}, "compute": round(self.compute, 4),
                "n": self.n}


def _outcome(full: np.ndarray, stages: Mapping[str, tuple[np.ndarray, np.ndarray]], margins: dict[str, float],
             cost: Mapping[str, float]) -> MarginChoice:
    choice, by = route(full, stages, margins)
    names = [*stages, "full"]
    decided = {s: float(np.mean(by == i)) for i, s in enumerate(names)}
    return MarginChoice(margins, float(np.mean(choice == full)), decided,
                        sum(decided[s] * cost.get(s, 1.0) for s in names), len(full))


def choose_margins(full: np.ndarray, stages: Mapping[str, tuple[np.ndarray, np.ndarray]], *,
                   agreement: float = DEFAULT_AGREEMENT, cost: Mapping[str, float] | None = None) -> MarginChoice:
    """The stages' margins for rows whose full-probe decisions are ``full``: the cascade agrees with them on at
    least ``agreement`` of the rows, at the least expected ``cost`` (per stage, as a share of the full pass: by
    default text 0, the full probes 1, any other stage 1), ties going to the smaller first margin. One or two
    stages (``stages``: decision and radius per row, in the order asked)."""
    if not 0 < agreement <= 1:
        raise ValueError("agreement must be in (0, 1]")
    if len(stages) > 2:
        raise ValueError("at most two stages before the full probes")
    cost = {"text": 0.0, "full": 1.0, **(cost or {})}  # another stage not costed: as the full pass
    n = len(full)
    budget = math.floor((1.0 - agreement) * n + 1e-9)
    items = list(stages.items())
    if not items:
        return _outcome(full, stages, {}, cost)
    (first, (c1, r1)), rest = items[0], items[1:]
    wrong1 = c1 != full
    if not rest:
        return _outcome(full, stages, {first: _smallest_margin(r1[wrong1], budget)}, cost)
    second, (c2, r2) = rest[0]
    wrong2 = c2 != full
    least = _smallest_margin(r1[wrong1], budget)
    above = np.unique(r1[wrong1 & (r1 >= least)])
    above = above[np.isfinite(above)]
    if len(above) > MAX_CANDIDATES:
        above = np.unique(np.quantile(above, np.linspace(0, 1, MAX_CANDIDATES), method="nearest"))
    best: tuple[float, float, float] | None = None  # (compute, m1, m2)
    for m1 in sorted({least, *(max(float(v), _SMALLEST) for v in above)}):
        left = (r1 <= m1) if m1 > 0 else np.zeros(n, dtype=bool)  # rows the first stage leaves
        spent = int(np.sum(~left & wrong1))
        if spent > budget:
            continue
        m2 = _smallest_margin(r2[left & wrong2], budget - spent)
        second_takes = left & (r2 > m2) if m2 > 0 else left
        compute = (cost.get(first, 1.0) * (n - left.sum()) + cost.get(second, 1.0) * second_takes.sum()
                   + cost["full"] * (left & ~second_takes).sum()) / n
        if best is None or compute < best[0] - 1e-12:
            best = (compute, m1, m2)
    assert best is not None  # the least first margin always fits the budget
    return _outcome(full, stages, {first: best[1], second: best[2]}, cost)


def stage_curve(full: np.ndarray, decision: np.ndarray, radius: np.ndarray,
                levels: Sequence[float] = AGREEMENT_LEVELS) -> list[dict[str, float]]:
    """One stage alone before the full probes: its margin and the share of rows it decides at each agreement."""
    out = []
    for level in levels:
        choice = choose_margins(full, {"stage": (decision, radius)}, agreement=level)
        out.append({"agreement": level, "margin": round(choice.margins["stage"], 6),
                    "decided": round(choice.decided["stage"], 4)})
    return out


def stage_costs(scorer: ScorerConfig, early_layer: int | None) -> dict[str, float]:
    """The share of the full pass each stage runs: none for text, the blocks up to the early one for early."""
    return {"text": 0.0, **({"early": early_layer / max(scorer.layers)} if early_layer else {}), "full": 1.0}


def cascade_block(p: Mapping[str, np.ndarray], cost: np.ndarray, names: Sequence[str], rule: Rule, *,
                  agreement: float = DEFAULT_AGREEMENT, compute: Mapping[str, float] | None = None,
                  data: str = "") -> dict[str, Any]:
    """What a probe file records of its cascade (the same for every backend of a pool): the margins chosen on
    held-out estimates ``p`` (per stage and "full": (rows, backends)) for ``rule``, the single-stage agreement
    curves, and, in threshold mode, the margins chosen for every threshold of ``THRESHOLD_GRID`` (a threshold
    moved later by ``probes calibrate`` or a request's header finds its margins there)."""
    order = [s for s in ("text", "early") if s in p]

    def at(r: Rule) -> MarginChoice:
        full = decisions(p["full"], cost, names, r)[0]
        return choose_margins(full, {s: decisions(p[s], cost, names, r) for s in order}, agreement=agreement,
                              cost=compute)

    chosen = at(rule)
    full = decisions(p["full"], cost, names, rule)[0]
    block: dict[str, Any] = {
        "agreement": agreement,
        "policy": rule.as_dict(),
        **chosen.as_dict(),
        "chosen_on": (f"inner out-of-fold estimates of {data or 'the training data'} (every stage's and the full "
                      "probes'), the margins that keep the cascade's decisions the full probes' on at least "
                      "`agreement` of the questions at the least expected scorer compute"),
        "curves": {s: stage_curve(full, *decisions(p[s], cost, names, rule)) for s in order},
    }
    if rule.mode == "threshold":
        block["by_threshold"] = []
        for t in THRESHOLD_GRID:
            c = at(Rule("threshold", t, rule.cost_weight, rule.fallback, rule.margin))
            block["by_threshold"].append({"threshold": t, "margins": {s: round(m, 6) for s, m in c.margins.items()},
                                          "decided": {s: round(v, 4) for s, v in c.decided.items()}})
    return block


@dataclass(frozen=True)
class StageModels:
    """Every model of one backend the cascade asks, fitted on the same rows and labels."""

    fits: dict[str, Calibrated]  # "text", "early" (if any), "full"


def stage_model(stage: str, text: str, model: Any) -> Any:
    """The model class of a stage: the text stage reads the text features alone (with the length feature unless
    the full probe reads TF-IDF without it, so one vocabulary serves every model); the early stage is fitted as
    the full probe (``model``), on its block's features."""
    if stage == "text":
        return TextOnly(length=text != "tfidf")
    return model


def early_scorer(scorer: ScorerConfig, layer: int) -> ScorerConfig:
    """The scorer recipe an early stage reads: the configured one, cut at ``layer``."""
    if layer >= max(scorer.layers):
        raise ValueError(f"the early block ({layer}) must come before the scorer's deepest block "
                         f"({max(scorer.layers)})")
    return type(scorer).model_validate(scorer.model_dump() | {"layers": [layer]})


def early_layer_for(settings: Settings, override: int | None = None) -> int | None:
    """The early block to train for: ``override``, else ``policy.cascade.early_layer``; None when it is not
    before the scorer's deepest block (a shallow recipe has no cheaper block to stop at)."""
    layer = override if override is not None else settings.policy.cascade.early_layer
    if layer is None or layer >= max(settings.scorer.layers):
        return None
    return layer


def fit_stage(stage: str, x: Any, ys: Sequence[np.ndarray], y: np.ndarray, *, text: str, model: Any,
              cs: Sequence[Any], folds: int, seed: int) -> Calibrated:
    """One stage's model of one backend: C by inner CV, Platt on its inner out-of-fold logits."""
    return fit_calibrated(x, ys, y, cs=cs, folds=folds, seed=seed, model=stage_model(stage, text, model))


@dataclass(frozen=True)
class CascadeTraining:
    """What ``probes train`` fits and chooses for the cascade."""

    early_layer: int | None = 6  # None: no early stage
    agreement: float = DEFAULT_AGREEMENT


def _summary(y: np.ndarray, p: np.ndarray, what: str) -> dict[str, Any]:
    from sklearn.metrics import brier_score_loss, roc_auc_score

    return {f"{what}_auroc": round(float(roc_auc_score(y, p)), 4) if len(np.unique(y)) > 1 else None,
            f"{what}_brier": round(float(brier_score_loss(y, p)), 4)}


def stage_probes(
    inputs: Mapping[str, Any], early_scorer_block: dict[str, Any] | None, ys: Sequence[np.ndarray], y: np.ndarray, *,
    text: str, model: Any, cs: Sequence[Any], folds: int, seed: int,
    calibration: tuple[Mapping[str, Any], np.ndarray] | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """One backend's stage models as probes (``router.probe.Probe``), and each one's held-out estimates of the
    rows the margins are chosen on: the inner out-of-fold estimates of the training rows, or, with
    ``calibration`` (its inputs per stage and labels), Platt re-fitted there and the estimates of its rows.
    ``inputs``: per stage ("text", "early"), what it reads of the training rows."""
    from dataclasses import replace

    from probes.fit import probe_logits, recalibrated

    probes: dict[str, Any] = {}
    held: dict[str, np.ndarray] = {}
    for stage, x in inputs.items():
        fitted = fit_stage(stage, x, ys, y, text=text, model=model, cs=cs, folds=folds, seed=seed)
        probe = replace(fitted.scorer.probe(), platt_a=fitted.a, platt_b=fitted.b)  # type: ignore[attr-defined]
        metrics = _summary(y, fitted.inner_probability, "inner_oof") | {
            "note": "inner out-of-fold on the training data (C chosen on the same folds): what its margin is chosen on"}
        if calibration is not None:
            x_cal, y_cal = calibration[0][stage], calibration[1]
            probe = recalibrated(probe, probe_logits(probe, x_cal), y_cal)
            held[stage] = probe.predict_logits(probe_logits(probe, x_cal))
            metrics["calibration"] = _summary(y_cal, held[stage], "held_out")
        else:
            held[stage] = fitted.inner_probability
        c = fitted.c
        what = "the text features alone" if stage == "text" else f"as the full probe (text features: {text})"
        probes[stage] = replace(probe, scorer=early_scorer_block if stage == "early" else {},
                                training={"model": what, "C": list(c) if isinstance(c, tuple) else c},
                                metrics=metrics)
    return probes, held


@dataclass(frozen=True)
class StageInputs:
    """What the stages of the backends reading one scorer read: of the training rows and of the calibration rows
    (if any), with the rows the margins are chosen on and their prompt lengths (for their costs)."""

    train: dict[str, Any]  # per stage
    calibration: dict[str, Any] | None
    early_block: dict[str, Any] | None  # the early stage's scorer recipe and fingerprint
    chosen_on: Any  # probes.data.Dataset: the calibration data if any, else the training data
    prompt_tokens: np.ndarray

    def cost(self, backend: Any, output_tokens: int) -> np.ndarray:
        from probes.data import estimate_costs

        return estimate_costs(self.chosen_on, backend, self.prompt_tokens, output_tokens)[0]


def text_inputs(dataset: Any) -> Any:
    """What the text stage reads of a dataset: its prompt texts (as ``Inputs`` with no activations)."""
    from probes.fit import Inputs
    from router import prompt_text

    texts = tuple(prompt_text(c) for c in dataset.conversations())
    return Inputs(np.zeros((len(texts), 0), dtype=np.float32), texts)


def cascade_inputs(cfg: ScorerConfig, dataset: Any, calibration: Any, text: str, cascade: CascadeTraining,
                   extractor: Any, *, progress: bool = True) -> StageInputs:
    """The stages' inputs for backends reading scorer ``cfg``: the text features, and the scorer's features at the
    early block (extracted through the same scorer interface with ``layers`` cut there, and cached)."""
    from probes.extract import probe_inputs
    from router import scorer_block

    train: dict[str, Any] = {"text": text_inputs(dataset)}
    cal: dict[str, Any] | None = None if calibration is None else {"text": text_inputs(calibration)}
    block = None
    if cascade.early_layer is not None and cascade.early_layer < max(cfg.layers):
        early_cfg = early_scorer(cfg, cascade.early_layer)
        train["early"], early = probe_inputs(early_cfg, dataset, text, progress=progress)
        if cal is not None:
            cal["early"] = probe_inputs(early_cfg, calibration, text, scorer=early, progress=progress)[0]
        block = scorer_block(early.info)
    elif cascade.early_layer is not None:
        log.warning("no early stage: block %d is not before the scorer's deepest block %d", cascade.early_layer,
                    max(cfg.layers))
    chosen_on = calibration or dataset
    tokens = np.array([len(extractor.encoder.encode(c)) for c in chosen_on.conversations()], dtype=np.float64)
    return StageInputs(train, cal, block, chosen_on, tokens)


def add_margins(settings: Settings, written: Mapping[str, Any], held: Mapping[str, Mapping[str, np.ndarray]],
                costs: Mapping[str, np.ndarray], cascade: CascadeTraining, *, data: str = "") -> dict[str, Any]:
    """Choose the margins on every trained backend's held-out estimates (per backend: per stage and "full") for
    the config's policy, and write the cascade block into each probe file of ``written``; return it."""
    names = list(held)
    stages = [s for s in ("text", "early") if all(s in held[n] for n in names)]
    p = {s: np.column_stack([held[n][s] for n in names]) for s in [*stages, "full"]}
    cost = np.column_stack([costs[n] for n in names])
    rule = policy_rule(settings.policy)
    block = {"backends": names, **cascade_block(
        p, cost, names, rule, agreement=cascade.agreement,
        compute=stage_costs(settings.scorer, cascade.early_layer if "early" in stages else None), data=data)}
    write_cascade([written[n] for n in names], block)
    log.info("cascade margins %s for %s: decided %s, agreement %.4f on %s", block["margins"], rule.as_dict(),
             block["decided"], block["agreement"], data)
    return block


def recalibrate_margins(
    settings: Settings, dataset: Any, estimates: Any, threshold: float, *, calibration: Any = None,
    text: str = "none", folds: int = 5, seed: int = 0, label_keys: dict[str, str] | None = None,
    train_keys: dict[str, list[str]] | None = None, agreement: float = DEFAULT_AGREEMENT, progress: bool = True,
) -> tuple[dict[str, Any], list[Any]] | None:
    """After ``probes calibrate`` chose ``threshold``: the margins for it, chosen on the same held-out estimates
    the threshold was (``estimates``: ``probes.evaluate.PoolEstimates``, nested out-of-fold on ``dataset`` or
    probes trained on it applied to ``calibration``), with every stage's estimated the same way. None when the
    config's probe files carry no stages. Returns the cascade block and the probe paths to write it into."""
    from probes.fit import held_out
    from router import load_probe

    label_keys, train_keys = label_keys or {}, train_keys or {}
    backends = [settings.backend(n) for n in estimates.names]
    paths = [b.probe for b in backends if b.probe is not None]
    probes = [load_probe(path) for path in paths]
    if len(probes) < len(backends) or not all(p.stages for p in probes):
        return None
    layers = {p.early_layer for p in probes}
    early_layer = layers.pop() if len(layers) == 1 else None
    model, grid = probe_model(text)
    train = {"text": text_inputs(dataset)}
    held: dict[str, Any] = {"text": None if calibration is None else text_inputs(calibration)}
    if early_layer is not None and early_layer < max(settings.scorer.layers):
        from probes.extract import probe_inputs

        cfg = early_scorer(settings.scorer, early_layer)
        train["early"], scorer = probe_inputs(cfg, dataset, text, progress=progress)
        held["early"] = None if calibration is None else probe_inputs(cfg, calibration, text, scorer=scorer,
                                                                      progress=progress)[0]
    p: dict[str, np.ndarray] = {"full": estimates.p}
    for stage, x in train.items():
        columns = []
        for b in backends:
            key = label_keys.get(b.name, b.model)
            ys = [dataset.training_labels(k) for k in train_keys.get(b.name, [key])]
            columns.append(held_out(x, ys, dataset.labels(key), x_test=held[stage], cs=grid, folds=folds, seed=seed,
                                    model=stage_model(stage, text, model)).probability)
        p[stage] = np.column_stack(columns)
    rule = policy_rule(settings.policy, threshold)
    data = (calibration or dataset).path.name
    block = {"backends": list(estimates.names), **cascade_block(
        p, estimates.cost, estimates.names, rule, agreement=agreement,
        compute=stage_costs(settings.scorer, early_layer if "early" in p else None), data=data)}
    block["chosen_on"] = (f"held-out estimates of {data} (" + ("nested out-of-fold" if calibration is None else
                          "trained on " + dataset.path.name) + ", as `probes calibrate` chose the threshold)")
    return block, paths


def write_cascade(paths: Sequence[Any], block: dict[str, Any]) -> None:
    """Write ``block`` as the cascade of each probe file of ``paths`` (the models unchanged)."""
    from dataclasses import replace

    from router import load_probe, save_probe

    for path in paths:
        save_probe(replace(load_probe(path), cascade=block), path)
