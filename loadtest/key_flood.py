"""One key flooding the local scorer with long prompts, another sending questions: ways of sharing the scorer side by
side in one run, in interleaved rounds (issue #36.5).

``python -m loadtest.key_flood [--config config.yaml] [--schedulings fair,chunked] [--rounds 3] [--chunk-tokens N]
[--questions 20] [--flood 8] [--prompt-mb 3.5] [--timeout-s S] [--refused-pause-s 0.25]`` runs, round by round
(the order of the schedulings rotating), for each scheduling in its own process (so that memory figures are each
its own), the configured local scorer (``LocalScorer``, as the gateway runs it) and:

1. key B alone: ``--questions`` GSM8K questions, one at a time, each timed from ``score()`` to its result;
2. the flood: key A keeps ``--flood`` requests in the scorer at once, each a ``--prompt-mb`` MB prompt (cut to
   ``max_prompt_tokens`` tokens), sent again as soon as it is answered (``--refused-pause-s`` after a refusal);
   meanwhile B sends the same questions again.

Schedulings: ``chunked`` (the shipped batcher: per-key queues in deficit round robin by tokens, at most
``max_batch_tokens`` tokens to a pass, and a prompt longer than ``scorer.chunk_above_tokens`` scored in chunks of
``scorer.chunk_tokens`` tokens, other passes between them; ``--chunk-tokens`` sets them, default the config's, else
128; ``chunkedN`` with N tokens, so that one run compares sizes), ``fair`` (the same without chunks: ``chunk_tokens:
0``) and ``fifo`` (the batcher with both keys as one, no token cap and no chunks: first come, first served, batches
of up to ``max_batch_size`` prompts whatever their length, as before issue #36; A has at most ``--flood`` requests
in the scorer, as ``scorer.max_in_flight_per_key`` (8) allowed).
Prints one JSON object: for each scheduling, B's p50 / p90 seconds alone and during the flood, how many of B's
requests were scored (the others were refused or timed out: routed unscored), A's scored and refused requests, the
seconds one of A's prompts takes alone (what a pass of ``max_batch_tokens`` costs: without preempting a pass, B's
request waits for the one under way), and the process's resident memory before the flood and its peak during it;
and the ratios of B's p50 during / alone. With several rounds: each round's figures per scheduling, and their
medians (``median``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

from loadtest.procs import rotating_rounds
from loadtest.prompts import questions

SCHEDULINGS = ("fifo", "fair", "chunked")
DEFAULT_CHUNK_TOKENS = 128


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def quantiles(seconds: list[float]) -> dict[str, float | None]:
    if not seconds:
        return {"p50": None, "p90": None}
    ordered = sorted(seconds)
    return {"p50": round(statistics.median(ordered), 4), "p90": round(ordered[int(0.9 * (len(ordered) - 1))], 4)}


async def ask_one_at_a_time(scorer: Any, texts: list[str], key: str, timeout_s: float | None,
                            queued: list[float] | None = None) -> tuple[list[float], Counter]:
    """Each text's seconds from ``score()`` to its result (and, into ``queued``, before its pass began), and the
    refusals by kind."""
    from router.scorer import ScorerUnavailable

    took, refused = [], Counter()
    for text in texts:
        start = time.perf_counter()
        try:
            scored = await scorer.score([{"role": "user", "content": text}], timeout_s, key=key)
            took.append(time.perf_counter() - start)
            if queued is not None:
                queued.append(scored.queue_s)
        except ScorerUnavailable as e:
            refused[e.kind] += 1
    return took, refused


async def measure(config: Path, scheduling: str, n_questions: int, flood: int, prompt_mb: float,
                  timeout_s: float | None, refused_pause_s: float, chunk_tokens: int | None = None) -> dict[str, Any]:
    from router import load_settings
    from router.scorer import LocalScorer, ScorerUnavailable

    cfg = load_settings(config).scorer
    if timeout_s is not None:
        cfg = cfg.model_copy(update={"timeout_s": timeout_s})
    if scheduling.startswith("chunked"):
        size = int(scheduling.removeprefix("chunked") or 0) or chunk_tokens or cfg.chunk_tokens or DEFAULT_CHUNK_TOKENS
        cfg = cfg.model_copy(update={"chunk_tokens": size})
    else:
        cfg = cfg.model_copy(update={"chunk_tokens": 0})
    if scheduling == "fifo":
        cfg = cfg.model_copy(update={"max_batch_tokens": 10**9})
    key_a, key_b = ("", "") if scheduling == "fifo" else ("a", "b")
    scorer = LocalScorer.load(cfg)
    passes: list[Any] = []  # BatchStats of every pass, from the flood on
    await scorer.start(on_batch=passes.append)
    texts = questions(n_questions)
    long_texts = []  # distinct prompts, as separate requests would bring
    base = " ".join(questions(2000))
    for i in range(flood):
        text = f"{i} " + base
        long_texts.append((text * (int(prompt_mb * 2**20) // len(text) + 1))[:int(prompt_mb * 2**20)])
    long_tokens = len(scorer.encoder.encode([{"role": "user", "content": long_texts[0]}]))
    try:
        await ask_one_at_a_time(scorer, texts[:3], key_b, cfg.timeout_s)  # warm
        alone_queued: list[float] = []
        alone, alone_refused = await ask_one_at_a_time(scorer, texts, key_b, cfg.timeout_s, alone_queued)
        a_alone, _ = await ask_one_at_a_time(scorer, long_texts[:3], key_a, None)
        before = rss_mb()
        peak = before
        done = asyncio.Event()
        a_scored, a_refused = 0, Counter()

        async def flooding(text: str) -> None:
            nonlocal a_scored
            while not done.is_set():
                try:
                    await scorer.score([{"role": "user", "content": text}], cfg.timeout_s, key=key_a)
                    a_scored += 1
                except ScorerUnavailable as e:
                    a_refused[e.kind] += 1
                    await asyncio.sleep(refused_pause_s)  # a client answered unscored is busy with the answer

        async def sampling() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, rss_mb())
                await asyncio.sleep(0.05)

        tasks = [asyncio.create_task(flooding(t)) for t in long_texts] + [asyncio.create_task(sampling())]
        await asyncio.sleep(1.0)  # the flood under way
        started = time.perf_counter()
        passes.clear()
        during_queued: list[float] = []
        during, during_refused = await ask_one_at_a_time(scorer, texts, key_b, cfg.timeout_s, during_queued)
        flood_passes = list(passes)
        flood_s = time.perf_counter() - started
        done.set()
        await asyncio.gather(*tasks)
    finally:
        await scorer.aclose()
    return {
        "max_batch_tokens": cfg.max_batch_tokens or cfg.max_prompt_tokens, "chunk_tokens": cfg.chunk_tokens or None,
        "chunk_above_tokens": cfg.chunk_above_tokens if cfg.chunk_tokens else None,
        "a_prompt_tokens": long_tokens, "timeout_s": cfg.timeout_s,
        "b_alone_s": quantiles(alone), "b_alone_unscored": dict(alone_refused), "a_alone_s": quantiles(a_alone),
        "b_flood_s": quantiles(during), "b_flood_scored": len(during), "b_flood_unscored": dict(during_refused),
        # of those seconds, waiting for a pass to begin; and the passes of the flood by what they held
        "b_alone_queue_s": quantiles(alone_queued), "b_flood_queue_s": quantiles(during_queued),
        "flood_passes": pass_figures(flood_passes),
        "a_scored": a_scored, "a_unscored": dict(a_refused), "flood_s": round(flood_s, 1),
        "rss_mb_before_flood": round(before, 1), "rss_mb_growth_peak": round(peak - before, 1),
    }


def pass_figures(passes: list[Any]) -> dict[str, Any]:
    """The passes' count, tokens and seconds (p50), those that held a chunk of a long prompt apart."""
    out = {}
    for name, group in (("with_chunk", [p for p in passes if p.chunks]),
                        ("without", [p for p in passes if not p.chunks])):
        out[name] = {"passes": len(group),
                     "tokens_p50": statistics.median([p.tokens for p in group]) if group else None,
                     "seconds": quantiles([p.forward_s for p in group])}
    return out


def medians(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The median over rounds of a scheduling's headline figures."""
    def med(values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return round(statistics.median(known), 4) if known else None

    alone = [r["b_alone_s"]["p50"] for r in rounds]
    during = [r["b_flood_s"]["p50"] for r in rounds]
    return {"b_alone_p50_s": med(alone), "b_flood_p50_s": med(during),
            "b_p50_flood_over_alone": med([d / a if a and d else None for a, d in zip(alone, during, strict=True)]),
            "b_flood_p90_s": med([r["b_flood_s"]["p90"] for r in rounds]),
            "b_flood_queue_p50_s": med([r["b_flood_queue_s"]["p50"] for r in rounds]),
            "b_flood_scored": med([r["b_flood_scored"] for r in rounds]),
            "a_alone_p50_s": med([r["a_alone_s"]["p50"] for r in rounds]),
            "a_scored": med([r["a_scored"] for r in rounds]),
            "rss_mb_growth_peak": med([r["rss_mb_growth_peak"] for r in rounds])}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.key_flood", description=__doc__)
    parser.add_argument("--config", type=Path, default=Path("config.yaml"))
    parser.add_argument("--schedulings", default="fair,chunked", help="comma-separated, of " + ", ".join(SCHEDULINGS)
                        + " and chunkedN (chunks of N tokens)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chunk-tokens", type=int, help="the chunked scheduling's scorer.chunk_tokens (default: the "
                        f"config's, else {DEFAULT_CHUNK_TOKENS})")
    parser.add_argument("--questions", type=int, default=20)
    parser.add_argument("--flood", type=int, default=8, help="key A's requests in the scorer at once")
    parser.add_argument("--prompt-mb", type=float, default=3.5)
    parser.add_argument("--timeout-s", type=float, help="how long a request may wait for its score (default: the "
                        "config's scorer.timeout_s)")
    parser.add_argument("--refused-pause-s", type=float, default=0.25, help="how long one of A's clients waits "
                        "after its request was refused (answered unscored) before it sends the next")
    parser.add_argument("--scheduling", help="measure this one here (the parent runs each)")
    args = parser.parse_args()
    if args.scheduling:
        print(json.dumps(asyncio.run(measure(args.config, args.scheduling, args.questions, args.flood,
                                             args.prompt_mb, args.timeout_s, args.refused_pause_s,
                                             args.chunk_tokens))), flush=True)
        return
    schedulings = [s for s in args.schedulings.split(",") if s]
    if unknown := {s for s in schedulings if s not in SCHEDULINGS
                   and not (s.startswith("chunked") and s.removeprefix("chunked").isdigit())}:
        parser.error(f"unknown schedulings {sorted(unknown)}")
    common = ["--config", str(args.config), "--questions", str(args.questions), "--flood", str(args.flood),
              "--prompt-mb", str(args.prompt_mb), "--refused-pause-s", str(args.refused_pause_s),
              *(["--timeout-s", str(args.timeout_s)] if args.timeout_s is not None else []),
              *(["--chunk-tokens", str(args.chunk_tokens)] if args.chunk_tokens else [])]
    rounds = rotating_rounds(
        "loadtest.key_flood", common, "--scheduling", schedulings, args.rounds,
        lambda m: f"B p50 alone {m['b_alone_s']['p50']} s, in the flood {m['b_flood_s']['p50']} s; ")
    print(json.dumps({"questions": args.questions, "flood": args.flood, "prompt_mb": args.prompt_mb,
                      "rounds": args.rounds, "median": {s: medians(rs) for s, rs in rounds.items()},
                      "per_round": rounds}))


if __name__ == "__main__":
    main()
