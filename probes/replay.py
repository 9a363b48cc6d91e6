"""``python -m probes replay``: the learning gateway's code on real labelled data, question by question.

A stream of labelled questions goes, in order, through the gateway's own pieces: the scorer's features (cached
extraction through the ``Scorer`` interface, ``probes.extract``), the probes (``router.probe.ProbeSet``), the policy
(``router.policy``), exploration (``router.learning.exploration``), the threshold controller
(``router.learning.target``) and the learner (``router.learning``: store, guard, registry). A fraction of the
answers is rated with the label of the backend that answered, never another's. Two arms see the same stream:

- ``static``: the configured probes, no exploration, no learning (what the gateway does today);
- ``learning``: exploration at ``--explore``, ratings stored, the learner refitting each backend after every
  ``--refit-every`` new ratings of it and promoting what passes its guard.

With ``--target``, both arms hold the target, and a third arm, ``fixed``, shows the configured threshold's
behaviour on the same stream. The report measures every arm over consecutive windows of ``--window`` questions:
accuracy, cost, dear share, and each backend's AUROC and ECE against that backend's true label (every backend's,
not only the answering one's: the data has them all), plus totals; after ``--after-ratings`` ratings, the same
over the rest of the stream; and at the end, on held-out rows never streamed, the learner's probes against
probes trained offline (cross-validated) on the very ratings the learner received.

The learner runs synchronously between two questions here (in the gateway it runs in its own process, some
seconds behind); everything else is the code the gateway runs.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from probes.data import Dataset, load_dataset
from probes.extract import extract_features
from probes.metrics import auroc as sk_auroc
from probes.metrics import ece as sk_ece
from router import (
    Option,
    Probe,
    ProbeSet,
    Settings,
    TargetConfig,
    choose_by_threshold,
    choose_by_utility,
    load_probe,
    prompt_text,
    request_cost,
)
from router.learning import (
    ExampleStore,
    Learner,
    LearnerSettings,
    Observation,
    Registry,
    ThresholdController,
    explore,
    make_entry,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stream:
    """The questions to replay, in order: features, texts, prompt tokens, every backend's label."""

    features: np.ndarray  # (n, d) float32
    messages: list[list[dict[str, str]]]
    prompt_tokens: np.ndarray
    labels: dict[str, np.ndarray]  # backend → 0/1 per question
    source: list[str]  # which part of the stream each question came from
    rows: list[int]  # the question's row in its file
    heldout: Stream | None = None


@dataclass(frozen=True)
class Part:
    """One file's share of the stream: which rows (filtered, shuffled with ``seed``), how many, the rest held out."""

    data: Path
    limit: int | None = None
    where: dict[str, list[str]] = field(default_factory=dict)
    shuffle: bool = True


def _rows(dataset: Dataset, part: Part, seed: int) -> tuple[list[int], list[int]]:
    rows = [i for i, r in enumerate(dataset.records)
            if all(str(r.get(k)) in vs for k, vs in part.where.items())]
    if part.shuffle:
        rng = np.random.default_rng(seed)
        rows = [rows[i] for i in rng.permutation(len(rows))]
    if part.limit is None:
        return rows, []
    return rows[: part.limit], rows[part.limit:]


def load_stream(settings: Settings, parts: Sequence[Part], label_keys: dict[str, str], seed: int,
                progress: bool = True) -> Stream:
    """Features (cached, through the configured scorer), messages, token counts and labels of every part's rows,
    one after the other; with one part, the rows its limit leaves out are kept as held-out rows."""
    probed = [b for b in settings.backends if b.probe is not None]
    if any(b.scorer is not None for b in probed):
        raise ValueError("replay supports probes that read the top-level scorer only")
    chunks: list[tuple[np.ndarray, list, np.ndarray, dict[str, np.ndarray], list[str], list[int]]] = []
    held: tuple | None = None
    for k, part in enumerate(parts):
        dataset = load_dataset(part.data)
        features, scorer = extract_features(settings.scorer, dataset, progress=progress)
        convs = dataset.conversations()
        tokens = np.array([len(scorer.encoder.encode(c)) for c in convs])
        labels = {b.name: dataset.labels(label_keys.get(b.name, b.model)) for b in probed}
        rows, rest = _rows(dataset, part, seed + k)

        def take(idx: list[int], features: np.ndarray = features, convs: list = convs, tokens: np.ndarray = tokens,
                 labels: dict[str, np.ndarray] = labels, name: str = part.data.name) -> tuple:
            ix = np.array(idx, dtype=np.int64)
            return (features[ix], [convs[i] for i in idx], tokens[ix], {n: y[ix] for n, y in labels.items()},
                    [name] * len(idx), list(idx))

        chunks.append(take(rows))
        if len(parts) == 1 and rest:  # a switching stream has no one population to hold out
            held = take(rest)
    cat = _concat(chunks)
    heldout = Stream(*_concat([held])) if held is not None else None
    return Stream(*cat, heldout=heldout)


def _concat(chunks: Sequence[tuple]) -> tuple:
    return (np.concatenate([c[0] for c in chunks]), [m for c in chunks for m in c[1]],
            np.concatenate([c[2] for c in chunks]),
            {n: np.concatenate([c[3][n] for c in chunks]) for n in chunks[0][3]},
            [s for c in chunks for s in c[4]], [r for c in chunks for r in c[5]])


# -- one arm -----------------------------------------------------------------------------------------------------


@dataclass
class Trace:
    """What happened to each question in one arm."""

    p: dict[str, list[float]]  # every backend's estimate as served at the time
    sent: list[str] = field(default_factory=list)
    chosen: list[str] = field(default_factory=list)
    correct: list[float] = field(default_factory=list)
    cost: list[float] = field(default_factory=list)
    chosen_cost: list[float] = field(default_factory=list)
    threshold: list[float] = field(default_factory=list)
    rated: list[bool] = field(default_factory=list)
    promotions: list[dict[str, Any]] = field(default_factory=list)
    refits: list[dict[str, Any]] = field(default_factory=list)
    ratings: dict[str, list[int]] = field(default_factory=dict)  # backend → indices of questions rated


@dataclass(frozen=True)
class ArmConfig:
    name: str
    learn: bool
    explore: float
    target: tuple[str, float] | None
    threshold: float


def run_arm(settings: Settings, stream: Stream, arm: ArmConfig, *, feedback_rate: float, refit_every: int,
            learner_settings: LearnerSettings, out: Path, seed: int, keys: int = 1) -> tuple[Trace, Registry | None]:
    now = 0.0  # the simulated clock: one second a question
    policy = settings.policy
    probed = [b for b in settings.backends if b.probe is not None]
    names = [b.name for b in probed]
    prices = {b.name: (b.input_cost_per_mtok, b.output_cost_per_mtok) for b in probed}
    cheapest = min(b.price_rank() for b in probed)
    dearer = {b.name for b in probed if b.price_rank() > cheapest}
    registry = store = learner = None
    if arm.learn:
        folder = out / f"{arm.name}-state"
        shutil.rmtree(folder, ignore_errors=True)
        registry = Registry(folder / "registry", clock=lambda: now)
        for b in probed:
            registry.ensure_base(b.name, b.probe)  # type: ignore[arg-type]
        store = ExampleStore(folder / "examples.sqlite3", max_rows=10 * learner_settings.window * len(names))
        anchors = {n: registry.load(n, "v1") for n in names}
        learner = Learner(store, registry, learner_settings, anchors, clock=lambda: now)
    probes = {b.name: load_probe(b.probe) for b in probed}  # type: ignore[arg-type]
    versions = dict.fromkeys(names, "v1")
    reads_text = any(p.text is not None for p in probes.values())
    fingerprint = next(iter(probes.values())).scorer.get("fingerprint", "")
    probe_set = ProbeSet(names, [probes[n] for n in names])
    controller = None
    if arm.target is not None:
        t = policy.target
        if t is None or (t.kind, t.value) != arm.target:  # --target: the configured controller settings otherwise
            t = TargetConfig(kind=arm.target[0], value=arm.target[1])  # type: ignore[arg-type]
        controller = ThresholdController(arm.target[0], arm.target[1], initial=arm.threshold, window=t.window,
                                         half_life=t.half_life, feedback=t.feedback, gain=t.gain,
                                         min_entries=t.min_requests, clock=lambda: now)
    rng_rate = np.random.default_rng(seed)  # the same questions are rated in every arm
    rng_explore = random.Random(seed + 1)
    new_ratings = dict.fromkeys(names, 0)
    trace = Trace(p={n: [] for n in names}, ratings={n: [] for n in names})
    out_tokens = policy.expected_output_tokens
    for i in range(len(stream.labels[names[0]])):
        now = float(i)
        messages = stream.messages[i]
        estimates = probe_set.predict(stream.features[i], messages)
        options = [Option(n, request_cost(*prices[n], int(stream.prompt_tokens[i]), out_tokens), estimates[n])
                   for n in names]
        if policy.mode == "utility":
            decision = choose_by_utility(options, policy.cost_weight, policy.fallback, policy.margin)
            threshold = float("nan")
        else:
            if controller is not None and i % 10 == 0:
                controller.refresh()
            threshold = controller.threshold() if controller is not None else arm.threshold
            decision = choose_by_threshold(options, threshold, policy.fallback)
        explored = explore(decision, names, arm.explore, rng_explore)
        sent = explored.decision.backend
        cost = {o.name: o.cost for o in options}
        if controller is not None:
            controller.observe(make_entry(controller.kind, options, fallback=policy.fallback, dearer=dearer,
                                          sent_to=sent, at=now))
        for n in names:
            trace.p[n].append(estimates[n])
        trace.sent.append(sent)
        trace.chosen.append(explored.chosen)
        trace.correct.append(float(stream.labels[sent][i]))
        trace.cost.append(cost[sent])
        trace.chosen_cost.append(cost[explored.chosen])
        trace.threshold.append(threshold)
        rated = bool(rng_rate.random() < feedback_rate)
        trace.rated.append(rated)
        if not rated:
            continue
        trace.ratings[sent].append(i)
        if store is None or learner is None or registry is None:
            continue
        observation = Observation.make(
            id=f"q{i}", at=now, key=f"replay-{i % keys}", backend=sent, chosen=explored.chosen,
            propensity=explored.propensity, estimates=estimates, versions=versions, fingerprint=fingerprint,
            features=stream.features[i], text=prompt_text(messages) if reads_text else None)
        store.add([observation.rated(float(stream.labels[sent][i]), rated_at=now + 0.5)])
        new_ratings[sent] += 1
        if new_ratings[sent] < refit_every:
            continue
        new_ratings[sent] = 0
        for outcome in [learner.refit(sent), *learner.share_shift()]:
            trace.refits.append({"question": i, **outcome.as_dict()})
            if outcome.promoted is None:
                continue
            versions[outcome.backend] = outcome.promoted
            probes[outcome.backend] = registry.load(outcome.backend, outcome.promoted)
            probe_set = ProbeSet(names, [probes[n] for n in names])
            trace.promotions.append({"question": i, "backend": outcome.backend, "version": outcome.promoted,
                                     "kind": outcome.kind, "n_train": outcome.n_train, "n_guard": outcome.n_guard})
            log.info("%s: question %d: %s promoted %s (%s)", arm.name, i, outcome.backend, outcome.promoted,
                     outcome.kind)
    if store is not None:
        store.close()
    return trace, registry


# -- measures ----------------------------------------------------------------------------------------------------


def _safe(f: Any, y: np.ndarray, p: np.ndarray) -> float | None:
    if len(y) == 0 or len(np.unique(y)) < 2:
        return None
    return round(float(f(y, p)), 4)


def summarise(trace: Trace, stream: Stream, idx: np.ndarray, dearer: set[str]) -> dict[str, Any]:
    """Accuracy, cost, dear share, exploration, and each backend's AUROC and ECE over questions ``idx``."""
    sent = np.array(trace.sent, dtype=object)[idx]
    chosen = np.array(trace.chosen, dtype=object)[idx]
    cost = np.array(trace.cost)[idx]
    out: dict[str, Any] = {
        "n": len(idx),
        "accuracy": round(float(np.mean(np.array(trace.correct)[idx])), 4),
        "cost": round(float(np.mean(cost)), 8),
        "cost_per_1k": round(float(np.mean(cost)) * 1000, 5),
        "dear_share": round(float(np.mean([s in dearer for s in sent])), 4),
        "explored_share": round(float(np.mean(sent != chosen)), 4),
        "explore_extra_cost_per_1k": round(float(np.mean(cost - np.array(trace.chosen_cost)[idx])) * 1000, 5),
        "share": {n: round(float(np.mean(sent == n)), 4) for n in trace.p},
        "auroc": {}, "ece": {}, "served": {},
    }
    for n, ps in trace.p.items():
        p, y = np.array(ps)[idx], stream.labels[n][idx]
        out["auroc"][n] = _safe(sk_auroc, y, p)
        out["ece"][n] = _safe(sk_ece, y, p)
        out["served"][n] = served_calibration(p[sent == n], y[sent == n])
    return out


def served_calibration(p: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Calibration on the questions a backend answered (the traffic it serves, what the gateway's predicted and
    realised accuracy compare): their count, mean estimate, accuracy and ECE (None without both outcomes)."""
    if len(y) == 0:
        return {"n": 0, "predicted": None, "accuracy": None, "ece": None}
    return {"n": len(y), "predicted": round(float(np.mean(p)), 4), "accuracy": round(float(np.mean(y)), 4),
            "ece": _safe(sk_ece, y, p)}


def ece_floor(p: np.ndarray, rounds: int = 200, seed: int = 0) -> float:
    """The ECE a perfectly calibrated estimate would show on these probabilities and this many questions (labels
    drawn from the estimates themselves): the noise floor under any measured ECE."""
    rng = np.random.default_rng(seed)
    return round(float(np.mean([sk_ece((rng.random(len(p)) < p).astype(int), p) for _ in range(rounds)])), 4)


def windows(trace: Trace, stream: Stream, size: int, dearer: set[str]) -> list[dict[str, Any]]:
    n = len(trace.sent)
    return [{"start": s, **summarise(trace, stream, np.arange(s, min(s + size, n)), dearer)}
            for s in range(0, n, size)]


def after_ratings(trace: Trace, count: int) -> int | None:
    """The first question after the arm had received ``count`` ratings (None if it never did)."""
    rated = np.flatnonzero(trace.rated)
    return int(rated[count - 1]) + 1 if len(rated) >= count else None


# -- the offline reference ---------------------------------------------------------------------------------------


def _inputs(s: Stream, idx: np.ndarray, text: str) -> Any:
    from probes.fit import Inputs

    if text == "none":
        return s.features[idx]
    return Inputs(s.features[idx], tuple(prompt_text(s.messages[i]) for i in idx))


def _text_kind(probe: Probe) -> str:
    return "none" if probe.text is None else "tfidf+length" if probe.text.length else "tfidf"


def _held_scores(probe: Probe, held: Stream, name: str) -> dict[str, float]:
    from probes.train import probe_logits

    p = probe.predict_logits(probe_logits(probe, _inputs(held, np.arange(len(held.rows)), _text_kind(probe))))
    y = held.labels[name]
    return {"auroc": round(float(sk_auroc(y, p)), 4), "ece": round(float(sk_ece(y, p)), 4)}


def offline_reference(stream: Stream, trace: Trace, finals: dict[str, Probe], statics: dict[str, Probe], *,
                      folds: int, seed: int) -> dict[str, Any]:
    """On the held-out rows: the static probes, the learner's final probes, and probes trained offline (C by
    cross-validation, Platt on out-of-fold logits: ``probes.fit.fit_probe``) on exactly the ratings each backend's
    learner received (labels of the backend that answered, on the rows it answered)."""
    from probes.fit import fit_probe, probe_model

    held = stream.heldout
    if held is None:
        return {}
    out: dict[str, Any] = {"heldout_questions": len(held.rows), "backends": {}}
    for name, static in statics.items():
        rows = np.array(trace.ratings[name], dtype=np.int64)
        y = stream.labels[name][rows]
        entry: dict[str, Any] = {"ratings": len(rows), "static": _held_scores(static, held, name),
                                 "learner": _held_scores(finals[name], held, name)}
        if len(rows) >= 50 and min(int(y.sum()), int(len(y) - y.sum())) >= folds:
            text = _text_kind(static)
            model, grid = probe_model(text)
            fitted = fit_probe(_inputs(stream, rows, text), y, cs=grid, folds=folds, seed=seed, model=model)
            entry["offline"] = _held_scores(fitted.probe, held, name) | {
                "cv_auroc_on_ratings": round(fitted.oof_auroc, 4), "C": fitted.c}
        out["backends"][name] = entry
    return out


# -- the whole replay --------------------------------------------------------------------------------------------


def replay(settings: Settings, stream: Stream, out: Path, *, feedback_rate: float, window: int, explore_share: float,
           target: tuple[str, float] | None, seed: int, refit_every: int, learner_settings: LearnerSettings,
           after: int, keys: int = 1, folds: int = 5, command: str = "") -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    probed = [b for b in settings.backends if b.probe is not None]
    cheapest = min(b.price_rank() for b in probed)
    dearer = {b.name for b in probed if b.price_rank() > cheapest}
    arms = [ArmConfig("static", False, 0.0, target, settings.policy.threshold),
            ArmConfig("learning", True, explore_share, target, settings.policy.threshold)]
    if target is not None:
        arms.append(ArmConfig("fixed", False, 0.0, None, settings.policy.threshold))
    report: dict[str, Any] = {
        "command": command, "questions": len(stream.rows), "feedback_rate": feedback_rate, "window": window,
        "explore": explore_share, "target": None if target is None else {"kind": target[0], "value": target[1]},
        "policy": {"mode": settings.policy.mode, "threshold": settings.policy.threshold,
                   "fallback": settings.policy.fallback, "cost_weight": settings.policy.cost_weight},
        "refit_every": refit_every, "seed": seed, "parts": sorted(set(stream.source), key=stream.source.index),
        "learner": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(learner_settings).items()},
        "always": {b.name: round(float(stream.labels[b.name].mean()), 4) for b in probed},
        "stream_rows": stream.rows,  # each streamed question's row in its file (parts one after the other)
    }
    traces: dict[str, Trace] = {}
    statics = {b.name: load_probe(b.probe) for b in probed}  # type: ignore[arg-type]
    for arm in arms:
        trace, registry = run_arm(settings, stream, arm, feedback_rate=feedback_rate, refit_every=refit_every,
                                  learner_settings=learner_settings, out=out, seed=seed, keys=keys)
        traces[arm.name] = trace
        entry: dict[str, Any] = {"windows": windows(trace, stream, window, dearer),
                                 "total": summarise(trace, stream, np.arange(len(trace.sent)), dearer),
                                 "ratings": {n: len(v) for n, v in trace.ratings.items()}}
        if arm.learn:
            entry["promotions"] = trace.promotions
            entry["refits"] = trace.refits
        report[arm.name] = entry
        if arm.learn and registry is not None:
            finals = {n: registry.current(n)[1] for n in statics}
            report["final_versions"] = {n: registry.current_name(n) for n in statics}
            report["offline_reference"] = offline_reference(stream, trace, finals, statics, folds=folds, seed=seed)
    start = after_ratings(traces["learning"], after)
    if start is not None and start < len(stream.rows):
        idx = np.arange(start, len(stream.rows))
        report["after_ratings"] = {
            "ratings": after, "from_question": start,
            **{name: summarise(t, stream, idx, dearer) for name, t in traces.items()},
            "ece_floor": {n: ece_floor(np.array(traces["learning"].p[n])[idx]) for n in statics},
        }
    if target is not None:
        report["target_check"] = _target_check(report, target, window)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out / "replay.png")
    return report


def _target_check(report: dict[str, Any], target: tuple[str, float], window: int) -> dict[str, Any]:
    kind, value = target
    key = {"dear_share": "dear_share", "cost_per_1k": "cost_per_1k", "expected_accuracy": None}[kind]
    if key is None:
        return {}
    out = {}
    for arm in ("static", "learning", "fixed"):
        values = [w[key] for w in report[arm]["windows"] if w["n"] == window]
        out[arm] = {"min": min(values), "max": max(values), "largest_miss": round(max(abs(v - value) for v in values),
                                                                                    4)}
    return out


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [a for a in ("static", "learning", "fixed") if a in report]
    styles = {"static": "--", "learning": "-", "fixed": ":"}
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for arm in arms:
        ws = report[arm]["windows"]
        x = [w["start"] + w["n"] for w in ws]
        axes[0, 0].plot(x, [w["accuracy"] for w in ws], styles[arm], marker="o", label=arm)
        axes[0, 1].plot(x, [w["dear_share"] for w in ws], styles[arm], marker="o", label=arm)
        if arm == "fixed":
            continue
        for k, name in enumerate(ws[0]["auroc"]):
            color = f"C{k}"
            axes[1, 0].plot(x, [w["auroc"][name] for w in ws], styles[arm], color=color, label=f"{name} ({arm})")
            axes[1, 1].plot(x, [w["ece"][name] for w in ws], styles[arm], color=color, label=f"{name} ({arm})")
    for ax, title in zip(axes.flat, ["accuracy (answering backend)", "share to dearer backends",
                                     "AUROC per backend (every backend's label)", "ECE per backend"], strict=True):
        ax.set_title(title)
        ax.set_xlabel("questions streamed")
        ax.grid(alpha=0.3)
    if report.get("target"):
        axes[0, 1].axhline(report["target"]["value"], color="grey", lw=0.8)
    for p in report.get("learning", {}).get("promotions", []):
        axes[1, 0].axvline(p["question"], color="grey", lw=0.3, alpha=0.4)
    axes[0, 0].legend(fontsize=8)
    axes[1, 0].legend(fontsize=7)
    fig.suptitle(f"replay: {', '.join(report['parts'])}; feedback {report['feedback_rate']}, explore "
                 f"{report['explore']}, window {report['window']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
