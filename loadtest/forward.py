"""The scorer's raw forward pass, alone: ``FeatureExtractor.features`` at batch 1 and 8 on the same prompts.

Run as its own process (``python -m loadtest.forward --config CFG --prompts N``) so that its torch threads
match the gateway's; prints one JSON object: milliseconds per prompt and per batch for each batch size.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from loadtest.prompts import questions
from router.config import load_settings
from router.scorer.features import FeatureExtractor


def measure(extractor: FeatureExtractor, texts: list[str], batch: int, repeats: int) -> dict[str, float]:
    conversations = [[{"role": "user", "content": t}] for t in texts]
    batches = [conversations[i:i + batch] for i in range(0, len(conversations) - batch + 1, batch)]
    extractor.features(batches[0])  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        for b in batches:
            extractor.features(b)
    elapsed = time.perf_counter() - start
    calls = repeats * len(batches)
    return {"batch": batch, "ms_per_batch": round(elapsed / calls * 1000, 3),
            "ms_per_prompt": round(elapsed / (calls * batch) * 1000, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.forward", description=__doc__)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    extractor = FeatureExtractor(load_settings(args.config).scorer)
    texts = questions(args.prompts)
    import torch

    result = {"threads": torch.get_num_threads(), "dtype": extractor.cfg.dtype,
              "layers": list(extractor.cfg.layers), "prompts": len(texts),
              "batches": [measure(extractor, texts, b, args.repeats) for b in (1, 8)]}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
