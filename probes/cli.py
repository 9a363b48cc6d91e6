"""``python -m probes``: build the probes the gateway loads."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from router.config import ConfigError, load_settings


def _train(args: argparse.Namespace) -> int:
    from probes.data import load_dataset
    from probes.train import train_probes

    settings = load_settings(args.config)
    labels = dict(item.split("=", 1) for item in args.label)
    written = train_probes(settings, load_dataset(args.data), out_dir=args.out, folds=args.folds, seed=args.seed,
                           label_keys=labels)
    if not written:
        print("error: no backend of the config has labels in the data", file=sys.stderr)
        return 1
    for name, path in written.items():
        print(f"{name}: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m probes", description=__doc__)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="fit one probe per backend (standardised L2 logistic regression, "
                           "C by inner CV, Platt on out-of-fold scores)")
    train.add_argument("--config", type=Path, default=Path("config.yaml"))
    train.add_argument("--data", type=Path, required=True, help="JSONL with 'question' and 'correct': {model: 0/1}")
    train.add_argument("--out", type=Path, help="write DIR/<backend>.json instead of each backend's probe path")
    train.add_argument("--folds", type=int, default=5)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--label", action="append", default=[], metavar="BACKEND=KEY",
                       help="read BACKEND's labels from correct[KEY] (default: its served model name)")
    train.set_defaults(run=_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
