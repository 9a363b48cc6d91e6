"""What an early exit inside the scorer's pass costs and saves, side by side in one process, on the same batches.

``python -m loadtest.early_exit [--config config.yaml] [--prompts 64] [--batch 8] [--exit-layer 6] [--rounds 5]``
times, in interleaved rounds (the median round counts), the configured packed pass over GSM8K questions in batches
of ``--batch``:

- the plain pass (``FeatureExtractor.features_from_ids``): the reference of every ratio;
- the staged pass (``staged_features_from_ids``) with every prompt asking for an exit at ``--exit-layer``, where
  0%, 50% (every other prompt of each batch) or 100% of them stop there; the decision is a constant, so the
  figures are the pass's own;
- the pass of a scorer configured to read ``--exit-layer`` only: the floor a batch that all stops could reach.

Prints one JSON object: seconds per batch, and each variant's time as a ratio of the plain pass's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loadtest.prompts import questions
from router import load_settings
from router.scorer import EarlyExit, FeatureExtractor

PLAIN = "plain pass"


def staged(extractor: FeatureExtractor, layer: int, stop_share: float) -> Callable[[Sequence[list[int]]], Any]:
    """The staged pass where ``stop_share`` of each batch's prompts, spread evenly (every other one for 50%), stop
    at ``layer``."""
    def run(batch: Sequence[list[int]]) -> Any:
        stops = [int((i + 1) * stop_share) > int(i * stop_share) for i in range(len(batch))]
        exits = [EarlyExit(layer, lambda f, s=s: s) for s in stops]
        return extractor.staged_features_from_ids(batch, exits)
    return run


def seconds_per_batch(features: Callable[[Sequence[list[int]]], Any], batches: list[list[list[int]]]) -> float:
    features(batches[0])  # warm
    start = time.perf_counter()
    for b in batches:
        features(b)
    return (time.perf_counter() - start) / len(batches)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.early_exit", description=__doc__)
    parser.add_argument("--config", type=Path, default=Path("config.yaml"))
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--exit-layer", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    cfg = load_settings(args.config).scorer
    extractor = FeatureExtractor(cfg)
    if extractor.early_exit_info(args.exit_layer) is None:
        raise SystemExit(f"the configured pass cannot stop at layer {args.exit_layer}")
    shallow = FeatureExtractor(cfg.model_copy(update={"layers": [args.exit_layer]}))
    ids = [extractor.encoder.encode([{"role": "user", "content": q}]) for q in questions(args.prompts)]
    batches = [ids[i:i + args.batch] for i in range(0, len(ids) - args.batch + 1, args.batch)]
    # the staged pass's features where nothing stops are the plain pass's, bit for bit (tests); checked here too
    plain_rows = extractor.features_from_ids(batches[0])
    went_on = np.stack([full for _, full in staged(extractor, args.exit_layer, 0.0)(batches[0])])
    assert np.array_equal(plain_rows, went_on)
    variants: dict[str, Callable[[Sequence[list[int]]], Any]] = {
        PLAIN: extractor.features_from_ids,
        f"exit at {args.exit_layer}, 0% stop": staged(extractor, args.exit_layer, 0.0),
        f"exit at {args.exit_layer}, 50% stop": staged(extractor, args.exit_layer, 0.5),
        f"exit at {args.exit_layer}, 100% stop": staged(extractor, args.exit_layer, 1.0),
        f"a pass reading layer {args.exit_layer} only": shallow.features_from_ids,
    }
    rounds: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(args.rounds):
        names = list(variants)
        names = names[r % len(names):] + names[:r % len(names)]
        for name in names:
            rounds[name].append(seconds_per_batch(variants[name], batches))
    median = {name: statistics.median(r) for name, r in rounds.items()}
    print(json.dumps({
        "model": extractor.info.model, "layers": list(cfg.layers), "pooling": cfg.pooling, "dtype": extractor.dtype,
        "threads": torch.get_num_threads(), "batch": args.batch, "batches": len(batches),
        "prompt_tokens_median": statistics.median(map(len, ids)),
        "s_per_batch": {name: round(s, 4) for name, s in median.items()},
        "vs_plain": {name: round(s / median[PLAIN], 3) for name, s in median.items()},
        "rounds_s": {name: [round(x, 4) for x in r] for name, r in rounds.items()},
    }))


if __name__ == "__main__":
    main()
