"""``python -m probes``: label datasets, extract scorer features, train, evaluate and calibrate the probes the
gateway loads. ``python -m probes COMMAND --help`` describes each command."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shlex
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from router import ConfigError, Settings, load_settings
from router.scorer import configure_openmp

if TYPE_CHECKING:
    from probes.cascade import CascadeTraining
    from probes.data import Dataset

DEFAULT_SWEEP_LAYERS = "3,6,9,12,15,18,21,24,27,30"
FORCE_HELP = ("write {what} even where a backend's own labels hold too few successes or failures to learn from "
              "(fewer than max(10, 2K²/(K−1)) of either with K folds: two of each in every inner held-out fold; "
              "13 at 5 folds), or where its out-of-fold AUROC's 95%% interval reaches 0.5 (chance); without it, "
              "those are refused, said why, and the command exits 1")


def _pairs(items: list[str], option: str, form: str) -> list[tuple[str, str]]:
    """A repeated option's NAME=VALUE items, split at the first ``=`` (``form`` says what the option wants)."""
    for item in items:
        if "=" not in item:
            raise ValueError(f"{option} wants {form}, not {item!r}")
    return [(name, value) for name, _, value in (item.partition("=") for item in items)]


def _label_keys(items: list[str]) -> dict[str, str]:
    return dict(_pairs(items, "--label", "BACKEND=KEY"))


def _train_keys(items: list[str]) -> dict[str, list[str]]:
    pairs = _pairs(items, "--train-labels", "BACKEND=KEY[+KEY...]")
    return {name: [k for k in keys.split("+") if k] for name, keys in pairs}


def _all_train_keys(args: argparse.Namespace, settings: Settings, dataset: Dataset) -> dict[str, list[str]]:
    """--train-labels, or with --share-labels every backend on all backends' labels, or with --share-labels all on
    every label set the data has (explicit ones win)."""
    from probes.evaluate import shared_keys

    explicit = _train_keys(args.train_labels)
    share = getattr(args, "share_labels", None)
    if share is None:
        return explicit
    if share == "all":
        return {b.name: dataset.label_sets() for b in settings.backends} | explicit
    return shared_keys(settings, dataset, _label_keys(args.label)) | explicit


def _settings(args: argparse.Namespace) -> Settings:
    """The config, with the command's scorer overrides, and the scorer's CPU settings in place before torch loads."""
    settings = load_settings(args.config)
    configure_openmp(settings.scorer)
    update = {}
    if getattr(args, "layers", None):
        update["layers"] = sorted({int(v) for v in args.layers.split(",")})
    if getattr(args, "pooling", None):
        update["pooling"] = args.pooling
    if update:
        scorer = type(settings.scorer).model_validate(settings.scorer.model_dump() | update)
        settings = settings.model_copy(update={"scorer": scorer})
    return settings


def _cascade(args: argparse.Namespace, settings: Settings) -> CascadeTraining | None:
    """What train fits for the cascade (None: --no-cascade)."""
    from probes.cascade import CascadeTraining, early_layer_for

    if not args.cascade:
        return None
    return CascadeTraining(early_layer_for(settings, args.early_layer), args.cascade_agreement)


def _label(args: argparse.Namespace) -> int:
    from probes.data import load_dataset
    from probes.label import label_dataset

    settings = _settings(args)
    dataset = load_dataset(args.data)
    summary = asyncio.run(label_dataset(
        settings, dataset, args.out, backends=args.backend or None, limit=args.limit, concurrency=args.concurrency,
        max_tokens=args.max_tokens, temperature=args.temperature, grader=args.grader, system=args.system,
        progress=not args.no_progress, samples=args.samples,
    ))
    print(f"{summary.done_now} answered now, {summary.done_before} done before, {summary.failed} failed "
          f"(rerun to retry them); results log {summary.results}; dataset {summary.out}")
    for name, stats in summary.per_backend.items():
        print(f"  {name}: {int(stats['right'])}/{int(stats['answered'])} right ({stats['accuracy']:.1%}), "
              f"{int(stats['prompt_tokens']):,} prompt + {int(stats['completion_tokens']):,} completion tokens, "
              f"${stats['cost']:.6f} (${stats['mean_cost']:.6f} a question), mean latency "
              f"{stats['mean_latency_s']:.2f}s")
    return 1 if summary.failed else 0


def _extract(args: argparse.Namespace) -> int:
    from probes.data import load_dataset
    from probes.extract import cache_path, extract_features

    settings = _settings(args)
    dataset = load_dataset(args.data)
    features, scorer = extract_features(settings.scorer, dataset, progress=not args.no_progress)
    path = cache_path(settings.scorer, scorer.info.fingerprint, dataset)
    print(f"{features.shape[0]} × {features.shape[1]} features ({scorer.info.recipe()}) in {path}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from probes.data import load_dataset
    from probes.guards import label_shortfall
    from probes.recipes import parse_recipes
    from probes.train import backend_labels, sweep_recipes, train_probes

    settings = _settings(args)
    dataset = load_dataset(args.data)
    extra: dict[str, object] = {}
    if args.where:
        dataset = dataset.where(_where(args.where))
        extra["where"] = args.where
    labels, train_keys = _label_keys(args.label), _all_train_keys(args, settings, dataset)
    labelled = backend_labels(settings, dataset, labels, train_keys)
    short = [s for name, (_, y, _, _) in labelled.items() if (s := label_shortfall(name, y, args.folds))]
    if labelled and len(short) == len(labelled) and not args.force:  # nothing to fit, not even a sweep
        for s in short:
            print(f"{s.message()}. No probe written (--force writes it anyway).", file=sys.stderr)
        print(f"error: no probe written ({', '.join(s.backend for s in short)}): too few labels", file=sys.stderr)
        return 1
    if args.sweep:
        recipes = parse_recipes(args.sweep_layers.split(","), args.sweep_pooling.split(","))
        outcome = sweep_recipes(settings, dataset, recipes, folds=args.folds, seed=args.seed, label_keys=labels,
                                train_keys=train_keys, progress=not args.no_progress, force=args.force)
        chosen = outcome.recipe
        print(f"sweep chose {chosen} (mean inner-CV AUROC over backends)")
        scorer = type(settings.scorer).model_validate(
            settings.scorer.model_dump() | {"layers": list(chosen.layers), "pooling": chosen.pooling})
        settings = settings.model_copy(update={"scorer": scorer})
        extra["sweep"] = outcome.table
    configured = load_settings(args.config).scorer
    if args.out is None and (settings.scorer.layers, settings.scorer.pooling) != (configured.layers,
                                                                                   configured.pooling):
        print(f"error: probes for layers {settings.scorer.layers}, pooling {settings.scorer.pooling} would not load "
              f"with the config's scorer; pass --out DIR, or set scorer.layers: {settings.scorer.layers} and "
              f"scorer.pooling: {settings.scorer.pooling} in {args.config}", file=sys.stderr)
        return 1
    calibration = load_dataset(args.calibration) if args.calibration else None
    result = train_probes(settings, dataset, out_dir=args.out, folds=args.folds, seed=args.seed, label_keys=labels,
                          train_keys=train_keys, extra_training=extra, text=args.text_features,
                          calibration=calibration, progress=not args.no_progress, cascade=_cascade(args, settings),
                          force=args.force)
    if not (result.written or result.refused):
        print("error: no backend of the config has labels in the data", file=sys.stderr)
        return 1
    for name, reasons in result.forced.items():
        if name in result.written:
            for why in reasons:
                print(f"{why}. Written anyway (--force).", file=sys.stderr)
    for name, path in result.written.items():
        chance = result.auroc[name]
        print(f"{name}: out-of-fold AUROC {chance.auroc:.3f}, 95% interval [{chance.low:.3f}, {chance.high:.3f}] "
              f"on {chance.n} questions → {path}")
    if result.written:
        print(f"scorer for these probes: layers: {settings.scorer.layers}, pooling: {settings.scorer.pooling}")
    for why in result.refused.values():
        print(f"{why}. No probe written{'' if args.force else ' (--force writes it anyway)'}.", file=sys.stderr)
    if result.refused:
        print(f"error: no probe written for {', '.join(result.refused)}", file=sys.stderr)
        return 1
    return 0


def _eval(args: argparse.Namespace) -> int:
    from probes.data import load_dataset
    from probes.evaluate import evaluate

    settings = _settings(args)
    dataset = load_dataset(args.data)
    report = evaluate(
        settings, dataset, args.out, test=load_dataset(args.test) if args.test else None, text=args.text_features,
        folds=args.folds, seed=args.seed, rounds=args.bootstrap,
        label_keys=_label_keys(args.label), train_keys=_all_train_keys(args, settings, dataset),
        command="python -m probes " + shlex.join(sys.argv[1:] if args.argv is None else args.argv),
        progress=not args.no_progress, cascade=_cascade(args, settings),
    )
    for name, entry in report["backends"].items():
        lo, hi = entry["auroc_ci95"]
        print(f"{name}: AUROC {entry['auroc']:.3f} [{lo:.3f}, {hi:.3f}], Brier {entry['brier']:.4f}, "
              f"ECE {entry['ece']:.4f}")
    if "routing" in report:
        routing = report["routing"]
        print(f"routing {routing['cheap']} → {routing['dear']}: APGR {routing['apgr']:.3f}")
    for router, entry in report.get("pool", {}).get("policies", {}).items():
        best = report["pool"]["always_best"]
        print(f"pool, {router}: argmax-p accuracy {entry['argmax_p']['accuracy']:.3f} (best single "
              f"{best['accuracy']:.3f}); threshold policy max accuracy {entry['threshold']['max_accuracy']:.3f}, "
              f"utility {entry['utility']['max_accuracy']:.3f}")
    if "cascade" in report:
        at = report["cascade"]["at_policy"]
        print("cascade: decided by " + ", ".join(f"{s} {v:.1%}" for s, v in at["decided"].items())
              + f"; agreement {at['agreement']:.4f}; accuracy {at['cascade']['accuracy']:.4f} (full probes "
              f"{at['full']['accuracy']:.4f})" + "".join(f"; APGR {v:.4f} ({k})" for k, v in
                                                         report["cascade"]["frontier"].get("apgr", {}).items()
                                                         if k != "note"))
    print(f"report: {args.out / 'report.md'}")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from probes.calibrate import choose_threshold, write_threshold
    from probes.data import load_dataset
    from probes.evaluate import labelled_backends, pool_estimates
    from probes.guards import auroc_check, label_shortfall

    settings = _settings(args)
    dataset = load_dataset(args.data)
    label_keys = _label_keys(args.label)
    short = [s for b, y in labelled_backends(settings, dataset, label_keys)
             if (s := label_shortfall(b.name, y, args.folds))]
    for s in short:
        print(f"{s.message()}.", file=sys.stderr)
    if short and not args.force:
        print(f"error: no threshold chosen or written: too few labels for {', '.join(s.backend for s in short)} "
              "(--force chooses one anyway)", file=sys.stderr)
        return 1
    calibration = load_dataset(args.calibration) if args.calibration else None
    estimates = pool_estimates(settings, dataset, calibration=calibration, text=args.text_features, folds=args.folds,
                               seed=args.seed, label_keys=label_keys,
                               train_keys=_all_train_keys(args, settings, dataset), progress=not args.no_progress)
    checks = [auroc_check(name, estimates.y[:, i], estimates.p[:, i], seed=args.seed,
                          what="out-of-fold" if calibration is None else "held-out")
              for i, name in enumerate(estimates.names)]
    choice = choose_threshold(estimates.threshold_frontier(), min_accuracy=args.min_accuracy,
                              max_cost=args.max_cost_per_request, max_dear_share=args.max_dear_share)
    expected = estimates.at_threshold(choice.threshold)
    print(json.dumps({"cheap": estimates.names[estimates.cheap], "dear": estimates.names[estimates.dear],
                      **choice.as_dict(), "expected_share": expected["share"],
                      "calibration_data": str(args.calibration or args.data),
                      "base_rate": {n: round(v, 4) for n, v in estimates.base_rate.items()},
                      "auroc": {c.backend: {"auroc": round(c.auroc, 4), "ci95": [round(c.low, 4), round(c.high, 4)]}
                                for c in checks}}, indent=2))
    for shift in estimates.base_rate_shifts():
        print(f"warning: base rates differ ({shift}): estimates trained on the one are calibrated on the other; "
              "the gateway's predicted-vs-realised accuracy panel shows whether live traffic drifts further",
              file=sys.stderr)
    if not choice.met:
        print("warning: no threshold meets the target; chose the closest operating point", file=sys.stderr)
    chance = [c for c in checks if not c.ok]
    for c in chance:
        print(f"{c.message()}.", file=sys.stderr)
    if chance and not args.force and not args.dry_run:
        print(f"error: threshold not written: the estimates of {', '.join(c.backend for c in chance)} do no better "
              "than chance (--force writes it anyway)", file=sys.stderr)
        return 1
    cascade = None
    if args.cascade and settings.policy.mode == "threshold":
        from probes.cascade import recalibrate_margins

        cascade = recalibrate_margins(
            settings, dataset, estimates, choice.threshold, calibration=load_dataset(args.calibration)
            if args.calibration else None, text=args.text_features, folds=args.folds, seed=args.seed,
            label_keys=_label_keys(args.label), train_keys=_all_train_keys(args, settings, dataset),
            agreement=args.cascade_agreement, progress=not args.no_progress)
        if cascade is not None:
            block = cascade[0]
            print(f"cascade margins for threshold {choice.threshold:.4f}: "
                  + ", ".join(f"{s} {m:.4f}" for s, m in block["margins"].items())
                  + " (decided by " + ", ".join(f"{s} {v:.1%}" for s, v in block["decided"].items())
                  + f"; agreement {block['agreement']:.4f})")
    if args.dry_run:
        return 0 if choice.met and not chance else 1
    write_threshold(args.config, choice.threshold)
    print(f"wrote policy.threshold: {choice.threshold:.4f} to {args.config}"
          + (" (--force)" if chance or short else ""))
    if cascade is not None:
        from probes.cascade import write_cascade

        block, paths = cascade
        write_cascade(paths, block)
        print(f"wrote the cascade margins into {', '.join(str(p) for p in paths)}")
    return 0 if choice.met else 1


def _recalibrate(args: argparse.Namespace) -> int:
    from probes.data import load_dataset
    from probes.extract import probe_inputs
    from probes.fit import probe_logits, recalibrated
    from probes.train import calibration_summary
    from router import load_probe, save_probe

    settings = _settings(args)
    sample = load_dataset(args.data)
    label_keys = _label_keys(args.label)
    inputs: dict[tuple[str, str], object] = {}
    done = 0
    for b in settings.backends:
        if b.probe is None:
            continue
        key = label_keys.get(b.name, b.model)
        try:
            y = sample.labels(key)
        except KeyError as e:
            print(f"skipping {b.name}: {e}", file=sys.stderr)
            continue
        probe = load_probe(b.probe)
        text = "none" if probe.text is None else "tfidf+length" if probe.text.length else "tfidf"
        scorer = settings.scorer_for(b)
        if (text, scorer.model_dump_json()) not in inputs:
            inputs[text, scorer.model_dump_json()] = probe_inputs(scorer, sample, text,
                                                                  progress=not args.no_progress)[0]
        x = inputs[text, scorer.model_dump_json()]
        before = calibration_summary(probe, x, y, sample, y)
        probe = recalibrated(probe, probe_logits(probe, x), y)
        after = calibration_summary(probe, x, y, sample, y)
        probe = replace(probe, metrics=probe.metrics | {"recalibrated": after | {"brier_before": before["brier"]}})
        target = (args.out / f"{b.name}.json") if args.out else b.probe
        save_probe(probe, target)
        done += 1
        print(f"{b.name}: Platt re-fitted on {len(y)} labelled requests (base rate {after['base_rate']:.3f}); "
              f"Brier {before['brier']:.4f} → {after['brier']:.4f}; weights unchanged → {target}")
    if not done:
        print("error: no probed backend has labels in the sample", file=sys.stderr)
        return 1
    return 0


def _where(items: list[str]) -> dict[str, list[str]]:
    return {name: values.split(",") for name, values in _pairs(items, "--where", "FIELD=VALUE[,VALUE...]")}


def _replay(args: argparse.Namespace) -> int:
    from probes.replay import Part, load_stream, replay
    from router.learning import LearnerSettings

    settings = _settings(args)
    if args.probes is not None:
        backends = [b.model_copy(update={"probe": (args.probes / f"{b.name}.json").resolve()}) if b.probe else b
                    for b in settings.backends]
        settings = settings.model_copy(update={"backends": backends})
    target = None
    if args.target:
        kind, _, value = args.target.partition("=")
        target = (kind, float(value))
    elif settings.policy.target is not None:
        target = (settings.policy.target.kind, settings.policy.target.value)
    if target is not None and settings.policy.mode != "threshold":
        raise ValueError("--target moves the threshold: the config's policy.mode must be 'threshold'")
    parts = [Part(args.data, args.limit, _where(args.where), not args.no_shuffle)]
    if args.then:
        parts.append(Part(args.then, args.then_limit, _where(args.then_where), not args.no_shuffle))
    stream = load_stream(settings, parts, _label_keys(args.label), args.seed, progress=not args.no_progress)
    learner_settings = LearnerSettings.from_config(settings.learning)
    explore = args.explore if args.explore is not None else (settings.policy.explore or 0.03)
    from threadpoolctl import threadpool_limits

    # The learner's fits are small: one BLAS thread does them fastest, and on shared cores many threads waiting on
    # each other made an SVD of 300 × 577 take 14 s instead of 0.15 s here.
    with threadpool_limits(limits=1, user_api="blas"):
        report = replay(settings, stream, args.out, feedback_rate=args.feedback_rate, window=args.window,
                        explore_share=explore, target=target, seed=args.seed,
                        refit_every=args.refit_every or settings.learning.refit_every_labels,
                        learner_settings=learner_settings, after=args.after_ratings, keys=args.keys,
                        folds=args.folds,
                        command="python -m probes " + shlex.join(sys.argv[1:] if args.argv is None else args.argv))
    for arm in ("static", "learning", "fixed"):
        if arm in report:
            t = report[arm]["total"]
            print(f"{arm}: accuracy {t['accuracy']:.4f}, cost per 1k ${t['cost_per_1k']:.4f}, dear share "
                  f"{t['dear_share']:.3f}, explored {t['explored_share']:.3f}; AUROC {t['auroc']}; ECE {t['ece']}")
    if "after_ratings" in report:
        a = report["after_ratings"]
        print(f"after {a['ratings']} ratings (questions {a['from_question']}-): static ECE {a['static']['ece']}, "
              f"learning ECE {a['learning']['ece']} (floor {a['ece_floor']}); AUROC static {a['static']['auroc']}, "
              f"learning {a['learning']['auroc']}")
    for name, entry in report.get("offline_reference", {}).get("backends", {}).items():
        print(f"held out, {name}: {entry}")
    print(f"report: {args.out / 'report.json'}, plot: {args.out / 'replay.png'}")
    return 0


def _common(p: argparse.ArgumentParser, *, data_required: bool = True) -> None:
    p.add_argument("--config", type=Path, default=Path("config.yaml"),
                   help="the gateway's config (default: %(default)s)")
    p.add_argument("--data", type=Path, required=data_required,
                   help="JSONL, one question a line: 'question' (and 'answer', 'correct': {model: 0/1})")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _scorer_override(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layers", help="override scorer.layers, e.g. 12,15,18")
    p.add_argument("--pooling", choices=["last", "mean", "last+mean"], help="override scorer.pooling")


def _labels_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--label", action="append", default=[], metavar="BACKEND=KEY",
                   help="read BACKEND's own labels from correct[KEY] (default: its served model name)")
    p.add_argument("--train-labels", action="append", default=[], metavar="BACKEND=KEY[+KEY...]",
                   help="train BACKEND's weights on these label sets, rows stacked once per set (C, Platt and "
                   "metrics still use its own labels); e.g. a dear model's probe on the cheap model's labels. A "
                   "KEY of the data's success_rate (k sampled answers, e.g. MODEL@k50_T0.6) is a graded label: "
                   "the share right counts as that much of a success")


def _sources_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text-features", choices=["none", "tfidf", "tfidf+length"], default="none",
                   help="text features of the prompt beside the scorer's activations, in one linear model "
                   "(TF-IDF of word 1-2-grams, log word count; computed by the gateway, saved in the probe file; "
                   "default: %(default)s)")
    p.add_argument("--share-labels", nargs="?", const="backends", choices=["backends", "all"],
                   help="train every backend's weights on all labelled backends' labels stacked (a shared "
                   "difficulty direction), or with 'all' on every label set the data has (every model's "
                   "correctness and success rate); C, Platt and the metrics stay per backend")


def _cascade_opts(p: argparse.ArgumentParser, *, switch: str | None = None, early: bool = True) -> None:
    if switch:
        p.add_argument("--cascade", action=argparse.BooleanOptionalAction, default=True, help=switch)
    if early:
        p.add_argument("--early-layer", type=int, metavar="BLOCK",
                       help="the scorer block the early stage reads (default: the config's "
                       "policy.cascade.early_layer; none unless it comes before the scorer's deepest block)")
    p.add_argument("--cascade-agreement", type=float, default=0.99, metavar="SHARE",
                   help="the margins are the smallest with which the cascade's decisions agree with the full "
                   "probes' on at least this share of held-out estimates, for the config's policy "
                   "(default: %(default)s)")


def _cv_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds, outer and inner (default: 5)")
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m probes", description=__doc__)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True)

    label = sub.add_parser("label", help="ask every backend every question, grade and record the answers",
                           description="Ask each backend of the config every question (OpenAI chat API), grade "
                           "the answers and record correctness, tokens, cost and latency. Resumable: finished "
                           "(question, backend) pairs in OUT.results.jsonl are skipped.")
    _common(label)
    label.add_argument("--out", type=Path, required=True, help="labelled dataset to write (JSONL)")
    label.add_argument("--backend", action="append", help="only this backend (repeatable; default: all)")
    label.add_argument("--limit", type=int, help="only the first N questions")
    label.add_argument("--concurrency", type=int, default=8, help="requests in flight per backend (default: 8)")
    label.add_argument("--max-tokens", type=int, default=3000, help="default: %(default)s")
    label.add_argument("--temperature", type=float, default=0.0, help="default: %(default)s")
    label.add_argument("--samples", type=int, default=1, metavar="K",
                       help="answers a question (default: 1). With K > 1 (and a --temperature above 0) the share "
                       "right is written as success_rate[MODEL@kK_TT], a graded label for train --train-labels; "
                       "correct stays for a run of one answer a question")
    label.add_argument("--grader", default="math", help="how answers are graded: math (default) or exact")
    label.add_argument("--system", help="a system message to send before each question")
    label.set_defaults(run=_label)

    extract = sub.add_parser("extract", help="write or refresh the scorer-feature cache for a dataset",
                             description="Compute the gateway's scorer features for every question and cache "
                             "them under scorer.cache_dir/features/FINGERPRINT/.")
    _common(extract)
    _scorer_override(extract)
    extract.set_defaults(run=_extract)

    train = sub.add_parser("train", help="fit one probe per backend (standardised L2 logistic regression, "
                           "C by inner CV, Platt on out-of-fold scores)",
                           description="Fit one probe per backend and write it where the config points (or to "
                           "--out). With --sweep, first choose the scorer's layers × pooling by inner CV. A backend "
                           "whose own labels hold too few successes or failures, or whose probe's out-of-fold AUROC "
                           "does no better than chance (its 95%% interval reaches 0.5), gets no probe: the command "
                           "says why and how many more questions to label, and exits 1 (--force writes it anyway).")
    _common(train)
    _scorer_override(train)
    train.add_argument("--out", type=Path, help="write DIR/<backend>.json instead of each backend's probe path")
    train.add_argument("--calibration", type=Path, help="labelled JSONL to re-fit Platt calibration on (the "
                       "weights are learnt on --data): data that looks like what the gateway will serve")
    _cv_opts(train)
    _labels_opts(train)
    _sources_opts(train)
    _cascade_opts(train, switch="also fit each backend's cascade stages (a text-only model; an early model at "
                  "--early-layer) and choose the margins they decide with (policy.cascade; default: on)")
    train.add_argument("--where", action="append", default=[], metavar="FIELD=V1[,V2...]",
                       help="train only on questions whose FIELD is one of the values (e.g. subject=Algebra); their "
                       "features come from the whole file's cache")
    train.add_argument("--force", action="store_true", help=FORCE_HELP.format(what="a probe"))
    train.add_argument("--sweep", action="store_true", help="choose scorer layers × pooling by inner CV")
    train.add_argument("--sweep-layers", default=DEFAULT_SWEEP_LAYERS,
                       help="candidate layer groups, comma-separated; '+' joins layers into one recipe, e.g. "
                       "'15,12+18' (default: %(default)s)")
    train.add_argument("--sweep-pooling", default="last,mean,last+mean", help="default: %(default)s")
    train.set_defaults(run=_train)

    ev = sub.add_parser("eval", help="held-out AUROC/Brier/ECE with bootstrap CIs, baselines, routing frontiers",
                        description="Held-out quality of each backend's probe (nested cross-validation on --data, "
                        "or trained on --data and scored on --test) beside baselines and reference "
                        "probabilities; the routing frontier (APGR) between the cheapest and the dearest backend; "
                        "and the accuracy/cost frontier of the threshold and utility policies over all backends. "
                        "Writes OUT/report.json, OUT/report.md, OUT/frontier.png and OUT/pool_frontier.png.")
    _common(ev)
    _scorer_override(ev)
    ev.add_argument("--out", type=Path, required=True, help="report folder")
    ev.add_argument("--test", type=Path, help="labelled JSONL to report on, trained on --data (default: nested "
                    "cross-validation on --data)")
    _cv_opts(ev)
    _labels_opts(ev)
    _sources_opts(ev)
    ev.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs (default: 1000)")
    ev.add_argument("--cascade", action=argparse.BooleanOptionalAction, default=False,
                    help="also route the held-out questions by the cascade (text-only models, then an early block, "
                    "then the full probes; margins chosen inside each training fold) against the full probes "
                    "(default: off)")
    _cascade_opts(ev)
    ev.set_defaults(run=_eval, argv=None)

    cal = sub.add_parser("calibrate", help="choose policy.threshold for a target and write it into the config",
                         description="Choose the threshold that meets one target under the gateway's threshold "
                         "policy over all backends, on held-out estimates (nested out-of-fold on --data, or "
                         "probes trained on --data applied to --calibration), print the expected share of "
                         "requests per backend and the accuracy, warn when the base rates of the training and "
                         "calibration data differ, and write it to the config's policy.threshold (comments kept). "
                         "Like train, it refuses (exit 1, no threshold written) where a backend has too few "
                         "successes or failures, or estimates no better than chance, unless --force.")
    _common(cal)
    _scorer_override(cal)
    cal.add_argument("--calibration", type=Path, help="labelled JSONL to choose the threshold on (probes trained "
                     "on --data): data that looks like what the gateway will serve")
    _cv_opts(cal)
    _labels_opts(cal)
    _sources_opts(cal)
    target = cal.add_mutually_exclusive_group(required=True)
    target.add_argument("--min-accuracy", type=float, help="cheapest threshold with at least this accuracy")
    target.add_argument("--max-cost-per-request", type=float,
                        help="most accurate threshold within this mean cost per request (USD)")
    target.add_argument("--max-dear-share", type=float, help="most accurate threshold sending at most this share "
                        "of requests to the dearest backend")
    cal.add_argument("--dry-run", action="store_true", help="report the choice, leave the config alone")
    _cascade_opts(cal, early=False, switch="where the config's probe files carry cascade stages, choose their "
                  "margins for the new threshold on held-out estimates made the same way, and write them into the "
                  "probe files (default: on; threshold mode)")
    cal.add_argument("--force", action="store_true", help=FORCE_HELP.format(what="the threshold"))
    cal.set_defaults(run=_calibrate)

    recal = sub.add_parser("recalibrate", help="re-fit only the probes' calibration on a labelled sample",
                           description="Re-fit each probe's Platt calibration (not its weights) on a small "
                           "labelled sample, e.g. of live traffic whose answers were graded, and write the probes "
                           "back where the config points (or to --out).")
    _common(recal)
    recal.add_argument("--out", type=Path, help="write DIR/<backend>.json instead of over each backend's probe")
    recal.add_argument("--label", action="append", default=[], metavar="BACKEND=KEY",
                       help="read BACKEND's labels from correct[KEY] (default: its served model name)")
    recal.set_defaults(run=_recalibrate)

    rep = sub.add_parser("replay", help="stream labelled questions through the gateway's scorer, probes, policy and "
                         "learner; compare learning with static probes over windows",
                         description="Stream --data's questions (filtered by --where, shuffled with --seed, the "
                         "first --limit; then --then's) through the gateway's own feature function, probes, policy, "
                         "exploration, threshold controller and learner. A share --feedback-rate of the answers is "
                         "rated with the label of the backend that answered. Arms 'static' (no learning) and "
                         "'learning' (and 'fixed', the configured threshold, with a target) are measured over windows "
                         "of --window questions; rows of --data left out by --limit are held out for comparing the "
                         "learner's final probes with probes trained offline on the same ratings. Writes "
                         "OUT/report.json and OUT/replay.png.")
    _common(rep)
    rep.add_argument("--out", type=Path, required=True, help="report folder")
    rep.add_argument("--feedback-rate", type=float, required=True, help="share of answers rated (0-1)")
    rep.add_argument("--window", type=int, default=500, help="questions per reported window (default: %(default)s)")
    rep.add_argument("--explore", type=float, help="exploration share of the learning arm (default: the config's "
                     "policy.explore, or 0.03 where that is 0)")
    rep.add_argument("--target", help="KIND=VALUE: dear_share, cost_per_1k or expected_accuracy, held by moving the "
                     "threshold (default: the config's policy.target)")
    rep.add_argument("--seed", type=int, default=0)
    rep.add_argument("--limit", type=int, help="stream only the first N questions of --data (after shuffling); the "
                     "rest are held out")
    rep.add_argument("--where", action="append", default=[], metavar="FIELD=V1[,V2...]",
                     help="only questions whose FIELD is one of the values (e.g. subject=Geometry,Precalculus)")
    rep.add_argument("--then", type=Path, help="a second labelled file streamed after --data (a traffic switch)")
    rep.add_argument("--then-limit", type=int)
    rep.add_argument("--then-where", action="append", default=[], metavar="FIELD=V1[,V2...]")
    rep.add_argument("--no-shuffle", action="store_true", help="keep the files' order (default: shuffled by --seed)")
    rep.add_argument("--probes", type=Path, help="read each probed backend's probe from DIR/<backend>.json instead")
    rep.add_argument("--label", action="append", default=[], metavar="BACKEND=KEY",
                     help="read BACKEND's labels from correct[KEY] (default: its served model name)")
    rep.add_argument("--refit-every", type=int, help="ratings of a backend between its refits (default: the "
                     "config's learning.refit_every_labels)")
    rep.add_argument("--after-ratings", type=int, default=1000, help="also report the stream after the learner "
                     "had this many ratings (default: %(default)s)")
    rep.add_argument("--keys", type=int, default=1, help="rating keys the ratings are spread over (default: 1)")
    rep.add_argument("--folds", type=int, default=5, help="folds of the offline reference probes' CV")
    rep.set_defaults(run=_replay, argv=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(args, "argv"):
        args.argv = argv
    # Libraries log at WARNING and above unless --log-level debug: their INFO lines (the HTTP client's one line per
    # request while labelling) are what the progress bars and the commands' own summaries say.
    level = getattr(logging, args.log_level.upper())
    logging.basicConfig(level=level if level == logging.DEBUG else max(level, logging.WARNING),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for ours in ("probes", "router"):
        logging.getLogger(ours).setLevel(level)
    if getattr(args, "no_progress", False):  # transformers' own bar while it loads the scorer's weights
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    try:
        return args.run(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
