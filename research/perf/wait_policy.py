"""The scorer's OpenMP wait policies side by side: ``python -m research.perf.wait_policy [--rounds 2] [--prompts 32]``.

OpenMP reads its wait settings when it loads, so each (round, policy) runs in a fresh process: the packed pass at
batch 1 after 20 ms idle (median latency: what a lone request pays) and at batch 8 back to back (prompts/s), with
the config's threads. Prints one JSON line per run; docs/deploy.md and docs/benchmarks.md quote it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from loadtest.prompts import questions
from router import load_settings
from router.scorer import configure_openmp

POLICIES = ("passive", "brief", "active")


def measure(config: Path, policy: str, prompts: int) -> dict[str, object]:
    cfg = load_settings(config).scorer.model_copy(update={"omp_wait_policy": policy})
    configure_openmp(cfg)
    from router.scorer import FeatureExtractor

    extractor = FeatureExtractor(cfg)
    ids = [extractor.encoder.encode([{"role": "user", "content": q}]) for q in questions(prompts)]
    extractor.features_from_ids(ids[:8])
    latencies = []
    for prompt in ids:
        time.sleep(0.02)
        start = time.perf_counter()
        extractor.features_from_ids([prompt])
        latencies.append(time.perf_counter() - start)
    start = time.perf_counter()
    for i in range(0, len(ids) - 7, 8):
        extractor.features_from_ids(ids[i:i + 8])
    rate = (len(ids) // 8 * 8) / (time.perf_counter() - start)
    return {"policy": policy, "b1_ms_after_idle": round(sorted(latencies)[len(latencies) // 2] * 1000, 1),
            "b8_prompts_per_s": round(rate, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m research.perf.wait_policy", description=__doc__)
    parser.add_argument("--config", type=Path, default=Path("config.yaml"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--policy", choices=POLICIES, help="measure this one policy in this process")
    args = parser.parse_args()
    if args.policy:
        print(json.dumps(measure(args.config, args.policy, args.prompts)))
        return
    for r in range(args.rounds):
        for policy in POLICIES:
            out = subprocess.run([sys.executable, "-m", "research.perf.wait_policy", "--config", str(args.config),
                                  "--prompts", str(args.prompts), "--policy", policy],
                                 capture_output=True, text=True, check=True).stdout
            print(json.dumps({"round": r + 1, **json.loads(out.strip().splitlines()[-1])}), flush=True)


if __name__ == "__main__":
    main()
