"""The scorer's raw forward pass, alone: the scorer's own pass at batch 1 and 8 (with the config's threads, as the
gateway runs it), transformers' padded pass at batch 8 on all cores (the reference), and the roofline
(``loadtest.roofline``), on the same prompts.

The reference is the pass issue 14 set its target against: transformers' padded pass over the blocks the shipped
recipe read then (``REFERENCE_RECIPE``: layer 15, last token), so that reading fewer blocks counts, as the issue
asks. When the config reads another recipe, transformers' padded pass over the config's own blocks is measured
beside it (``transformers-recipe``). It runs in the scorer's dtype (``scorer.dtype: auto``: float32 on a CPU
without native bf16); the issue measured it in bf16, so where the scorer's dtype is another, transformers' bf16
pass is measured too (``transformers-bf16``, one repeat: emulated bf16 is slow).

Run as its own process (``python -m loadtest.forward --config CFG --prompts N``) so that its torch threads
match the gateway's; prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from loadtest.prompts import questions
from loadtest.roofline import roofline
from router import load_settings
from router.scorer import FeatureExtractor

Features = Callable[[Sequence[Sequence[int]]], np.ndarray]

REFERENCE_RECIPE = {"layers": [15], "pooling": "last"}


def measure(features: Features, ids: list[list[int]], batch: int, repeats: int, name: str) -> dict[str, object]:
    batches = [ids[i:i + batch] for i in range(0, len(ids) - batch + 1, batch)]
    for b in batches:  # warm-up on every batch: oneDNN builds a kernel for each shape it meets, once
        features(b)
    start = time.perf_counter()
    for _ in range(repeats):
        for b in batches:
            features(b)
    elapsed = time.perf_counter() - start
    calls = repeats * len(batches)
    return {"pass": name, "batch": batch, "ms_per_batch": round(elapsed / calls * 1000, 3),
            "ms_per_prompt": round(elapsed / (calls * batch) * 1000, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.forward", description=__doc__)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    cfg = load_settings(args.config).scorer
    extractor = FeatureExtractor(cfg)
    same = {"layers": list(cfg.layers), "pooling": cfg.pooling} == REFERENCE_RECIPE
    reference = extractor if same else FeatureExtractor(cfg.model_copy(update=REFERENCE_RECIPE))
    ids = [extractor.encoder.encode([{"role": "user", "content": t}]) for t in questions(args.prompts)]
    import torch

    threads = torch.get_num_threads()
    batches = [measure(extractor.features_from_ids, ids, b, args.repeats, "scorer") for b in (1, 8)]
    torch.set_num_threads(os.cpu_count() or 1)
    batches.append(measure(reference.padded_features, ids, 8, args.repeats, "transformers"))
    if not same:
        batches.append(measure(extractor.padded_features, ids, 8, args.repeats, "transformers-recipe"))
    if extractor.dtype != "bfloat16":  # the reference ran in bf16: beside it where bf16 is emulated
        emulated = FeatureExtractor(cfg.model_copy(update={**REFERENCE_RECIPE, "dtype": "bfloat16"}))
        batches.append(measure(emulated.padded_features, ids, 8, 1, "transformers-bf16"))
    torch.set_num_threads(threads)
    result = {"threads": threads, "reference_threads": os.cpu_count() or 1, "dtype": extractor.dtype,
              "layers": list(extractor.cfg.layers), "pooling": extractor.cfg.pooling,
              "reference_recipe": REFERENCE_RECIPE, "prompts": len(ids), "packed": extractor.packed is not None,
              "batches": batches,
              "roofline": roofline(extractor, reference, ids, 8, batches[1]["ms_per_prompt"],
                                   batches[2]["ms_per_prompt"], reference_threads=os.cpu_count() or 1)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
