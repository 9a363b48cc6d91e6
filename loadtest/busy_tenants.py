"""Busy tenants side by side: what the flooding-key rule of the scorer's batcher costs keys that only send ordinary
questions, many at once (issue #36.5).

``python -m loadtest.busy_tenants [--config config.yaml] [--data FILE] [--keys 2] [--concurrency 8] [--requests 96]
[--rounds 3] [--variants keys,keys-no-rule,one-key]`` runs, round by round (the order rotating), each variant in its
own process: the configured local scorer (``LocalScorer``, as the gateway runs it) and ``--keys`` keys, each with
``--concurrency`` clients that send distinct questions of ``--data`` (a JSONL file with a "question" field, GSM8K
test by default) one after another until the key has sent ``--requests``. Every request is timed from ``score()``
to its result.

Variants (the same questions, the same clients):

- ``keys``: the shipped batcher. A key whose queued prompts reach a full pass's tokens while another key asked
  within the last second has its prompts over ``scorer.chunk_tokens`` scored in chunks (the rule that stops a key
  flooding with prompts just under ``scorer.chunk_above_tokens``); busy tenants meet that condition too.
- ``keys-no-rule``: the same with that rule off (``router.scorer.batcher.CONTENDED_S`` set to 0 in the measuring
  process, so no key ever counts as contended); prompts over ``chunk_above_tokens`` are still chunked.
- ``one-key``: every client under one key, where the rule cannot apply: the same load as one tenant.

Prints one JSON object: per variant and round, the prompts scored per second over the whole load, each key's p50 and
p90 seconds, the passes and how many held chunks, the mean prompts a pass; and the medians over rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

from loadtest.procs import rotating_rounds
from loadtest.prompts import DATA, questions

VARIANTS = ("keys", "keys-no-rule", "one-key")


def quantiles(seconds: list[float]) -> dict[str, float | None]:
    if not seconds:
        return {"p50": None, "p90": None}
    ordered = sorted(seconds)
    return {"p50": round(statistics.median(ordered), 4), "p90": round(ordered[int(0.9 * (len(ordered) - 1))], 4)}


async def measure(cfg: Any, variant: str, data: Path, keys: int, concurrency: int,
                  requests: int) -> dict[str, Any]:
    """One variant's load on a local scorer of ``cfg`` (a ``ScorerConfig``), in this process."""
    from router.scorer import batcher

    contended_s = batcher.CONTENDED_S
    if variant == "keys-no-rule":
        batcher.CONTENDED_S = 0.0  # no key ever counts as contended: the flooding-key rule never applies
    try:
        return await _load(cfg, variant, data, keys, concurrency, requests)
    finally:
        batcher.CONTENDED_S = contended_s


async def _load(cfg: Any, variant: str, data: Path, keys: int, concurrency: int, requests: int) -> dict[str, Any]:
    from router.scorer import LocalScorer, batcher

    scorer = LocalScorer.load(cfg)
    passes: list[Any] = []
    await scorer.start(on_batch=passes.append)
    texts = questions(keys * requests + 8, data=data)
    warm, texts = texts[:8], texts[8:]
    names = [f"key-{k}" for k in range(keys)]
    per_key = {name: texts[k * requests:(k + 1) * requests] for k, name in enumerate(names)}
    took: dict[str, list[float]] = {name: [] for name in names}
    tokens = [len(scorer.encoder.encode([{"role": "user", "content": t}])) for t in texts]
    try:
        await asyncio.gather(*(scorer.score([{"role": "user", "content": t}], None, key="warm") for t in warm))
        await asyncio.sleep(batcher.CONTENDED_S + 0.1)  # the warm-up's key no longer counts as asking

        async def client(name: str, queue: list[str]) -> None:
            key = "one" if variant == "one-key" else name
            while queue:
                text = queue.pop()
                start = time.perf_counter()
                await scorer.score([{"role": "user", "content": text}], None, key=key)
                took[name].append(time.perf_counter() - start)

        passes.clear()
        started = time.perf_counter()
        await asyncio.gather(*(client(name, per_key[name]) for name in names for _ in range(concurrency)))
        wall = time.perf_counter() - started
    finally:
        await scorer.aclose()
    scored = sum(len(v) for v in took.values())
    return {
        "variant": variant, "keys": keys, "concurrency_per_key": concurrency, "requests_per_key": requests,
        "chunk_tokens": cfg.chunk_tokens or None, "chunk_above_tokens": cfg.chunk_above_tokens,
        "max_batch_tokens": cfg.max_batch_tokens or cfg.max_prompt_tokens,
        "prompt_tokens": {"p50": statistics.median(tokens), "max": max(tokens),
                          "over_chunk_tokens": sum(t > (cfg.chunk_tokens or 10**9) for t in tokens)},
        "scored": scored, "prompts_per_s": round(scored / wall, 2), "wall_s": round(wall, 3),
        "per_key_s": {name: quantiles(v) for name, v in took.items()},
        "passes": len(passes), "passes_with_chunks": sum(1 for p in passes if p.chunks),
        "chunks": sum(p.chunks for p in passes),
        "mean_prompts_a_pass": round(sum(p.size - p.chunks for p in passes) / max(len(passes), 1), 2),
    }


def medians(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    def med(values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return round(statistics.median(known), 4) if known else None

    names = list(rounds[0]["per_key_s"])
    return {"prompts_per_s": med([r["prompts_per_s"] for r in rounds]),
            "p50_s": {n: med([r["per_key_s"][n]["p50"] for r in rounds]) for n in names},
            "p90_s": {n: med([r["per_key_s"][n]["p90"] for r in rounds]) for n in names},
            "passes_with_chunks": med([r["passes_with_chunks"] for r in rounds]),
            "mean_prompts_a_pass": med([r["mean_prompts_a_pass"] for r in rounds])}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.busy_tenants", description=__doc__)
    parser.add_argument("--config", type=Path, default=Path("config.yaml"))
    parser.add_argument("--data", type=Path, default=DATA, help="JSONL questions (a \"question\" field each)")
    parser.add_argument("--keys", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=8, help="clients of each key")
    parser.add_argument("--requests", type=int, default=96, help="requests each key sends")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of " + ", ".join(VARIANTS))
    parser.add_argument("--variant", help="measure this one here (the parent runs each)")
    args = parser.parse_args()
    if args.variant:
        from router import load_settings

        cfg = load_settings(args.config).scorer
        print(json.dumps(asyncio.run(measure(cfg, args.variant, args.data, args.keys, args.concurrency,
                                             args.requests))), flush=True)
        return
    variants = [v for v in args.variants.split(",") if v]
    if unknown := set(variants) - set(VARIANTS):
        parser.error(f"unknown variants {sorted(unknown)}")
    common = ["--config", str(args.config), "--data", str(args.data), "--keys", str(args.keys),
              "--concurrency", str(args.concurrency), "--requests", str(args.requests)]
    rounds = rotating_rounds("loadtest.busy_tenants", common, "--variant", variants, args.rounds)
    print(json.dumps({"data": str(args.data), "keys": args.keys, "concurrency_per_key": args.concurrency,
                      "requests_per_key": args.requests, "rounds": args.rounds,
                      "median": {v: medians(rs) for v, rs in rounds.items()}, "per_round": rounds}))


if __name__ == "__main__":
    main()
