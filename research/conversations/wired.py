"""Affinity on against off, and /v1/responses through the gateway against the stand-in directly, measured through
``make demo``'s real vLLM stand-ins (research/conversations/wired.md has the figures and how they were taken).

Two gateways in front of the same stand-ins, one with ``affinity.enabled: true`` (``--on``) and one with
``false`` (``--off``); each round runs ``loadtest.conversations`` against both, in alternating order, each run
opening its conversations with a system message naming it (``--tag``), so no run is served from a prefix
another run cached. Then ``--ttft-rounds`` rounds of ``loadtest.conversations ttft`` (the gateway naming a
backend, against that backend's stand-in asked directly, interleaved request by request). Writes every run's JSON
and a summary (medians over rounds) to ``--out``.

    .venv/bin/python -m research.conversations.wired --on http://127.0.0.1:8000/v1 --off http://127.0.0.1:8020/v1 \\
        --metrics http://127.0.0.1:8001/metrics http://127.0.0.1:8002/metrics --rounds 3 \\
        --direct http://127.0.0.1:8001/v1 --model Qwen/Qwen2.5-Math-1.5B-Instruct --ttft-rounds 3 \\
        --out research/conversations/wired.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

from loadtest.conversations import run_conversations, run_ttft


def conversation_args(url: str, tag: str, args: argparse.Namespace) -> argparse.Namespace:
    return argparse.Namespace(url=url, api_key="unused", model="router", seed=args.seed,
                              conversations=args.conversations, turns=args.turns, concurrency=args.concurrency,
                              max_tokens=args.max_tokens, session_header=None, metrics=args.metrics, tag=tag)


def median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 4) if present else None


def summarise(runs: list[dict[str, Any]], ttfts: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for variant in ("on", "off"):
        mine = [r["summary"] for r in runs if r["variant"] == variant]
        later = [t["ttft_s"] for r in runs if r["variant"] == variant for t in r["turns"] if t["turn"] > 1]
        hits = sum(s["prefix_cache"]["hits"] for s in mine if "prefix_cache" in s)
        queries = sum(s["prefix_cache"]["queries"] for s in mine if "prefix_cache" in s)
        out[variant] = {
            "runs": len(mine),
            "share_conversations_on_one_backend": [s["share_conversations_on_one_backend"] for s in mine],
            "share_later_turns_on_first_backend": [s["share_later_turns_on_first_backend"] for s in mine],
            "median_ttft_s_later_turns_per_run": [s["median_ttft_s_later_turns"] for s in mine],
            "median_ttft_s_turn_1_per_run": [s["median_ttft_s_turn_1"] for s in mine],
            "median_ttft_s_later_turns_pooled": median(later),
            "cached_share_of_later_prompt_tokens": [s["cached_share_of_later_prompt_tokens"] for s in mine],
            "prefix_cache_hit_rate_per_run": [s.get("prefix_cache", {}).get("hit_rate") for s in mine],
            "prefix_cache_hits": hits, "prefix_cache_queries": queries,
            "prefix_cache_hit_rate": round(hits / queries, 3) if queries else None,
            "reasons": [s["reasons"] for s in mine],
        }
    on, off = out["on"]["median_ttft_s_later_turns_pooled"], out["off"]["median_ttft_s_later_turns_pooled"]
    if on and off:
        out["ttft_later_turns_on_over_off"] = round(on / off, 3)
    if ttfts:
        out["responses_ttft"] = {
            "ratio_gateway_to_direct_per_round": [t["ratio_gateway_to_direct"] for t in ttfts],
            "median_ratio": median([t["ratio_gateway_to_direct"] for t in ttfts]),
            "median_ttft_s_gateway_pooled": median([v for t in ttfts for v in t["ttft_s"]["gateway"]]),
            "median_ttft_s_direct_pooled": median([v for t in ttfts for v in t["ttft_s"]["direct"]]),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m research.conversations.wired", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--on", required=True, help="a gateway with affinity on")
    parser.add_argument("--off", required=True, help="a gateway with affinity off, in front of the same stand-ins")
    parser.add_argument("--metrics", nargs="*", default=[], help="the stand-ins' /metrics URLs")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--conversations", type=int, default=30)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--direct", help="ttft: a stand-in's base URL")
    parser.add_argument("--model", help="ttft: that stand-in's served model name (the gateway's explicit path)")
    parser.add_argument("--ttft-rounds", type=int, default=0)
    parser.add_argument("--ttft-requests", type=int, default=40)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    stamp = int(time.time())
    runs: list[dict[str, Any]] = []
    ttfts: list[dict[str, Any]] = []
    for r in range(args.rounds):
        order = ["on", "off"] if r % 2 == 0 else ["off", "on"]
        for variant in order:
            tag = f"{stamp}-{r}-{variant}"
            result = asyncio.run(run_conversations(conversation_args(getattr(args, variant), tag, args)))
            runs.append({"round": r, "variant": variant, **result})
            print(json.dumps({"round": r, "variant": variant, **result["summary"]}), flush=True)
    for r in range(args.ttft_rounds):
        ns = argparse.Namespace(url=args.on, direct=args.direct, model=args.model, api_key="unused",
                                requests=args.ttft_requests, seed=args.seed + 1 + r)
        result = asyncio.run(run_ttft(ns))
        ttfts.append({"round": r, **result})
        print(json.dumps({"ttft_round": r, "median_ttft_s": result["median_ttft_s"],
                          "ratio": result["ratio_gateway_to_direct"]}), flush=True)
    summary = summarise(runs, ttfts)
    args.out.write_text(json.dumps({"summary": summary, "runs": runs, "ttft": ttfts}, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
