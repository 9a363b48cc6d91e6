"""Multi-turn conversations through a running gateway: do they stay on one backend, and what does it save?

``python -m loadtest.conversations --url http://127.0.0.1:8000/v1 [--conversations 30 --turns 6]`` holds
``--conversations`` chats of ``--turns`` user turns each (GSM8K test questions, one per turn; each turn sends the
whole conversation so far, the backend's real answers included), ``--concurrency`` conversations at a time,
streamed through the official openai client. Per turn it records the backend (``x-router-backend``), the reason
(``x-router-reason``), the time to the first content token, and the backend's usage (with ``cached_tokens`` where
the backend reports prompt token details). With ``--metrics`` (the backends' /metrics URLs) it also reads vLLM's
prefix-cache counters (``vllm:prefix_cache_hits_total`` / ``…queries_total``; the server must run with stats on)
before and after. Prints one JSON object: per-turn records and a summary (the share of conversations whose turns
all went to one backend, the share of later turns on the first turn's backend, median TTFT of turn 1 and of turns
2 to N, and the prefix-cache hit rate over the run). Run it once against a gateway with ``affinity.enabled: true``
and once with ``false`` (same stand-ins, same seed) to compare.

``python -m loadtest.conversations ttft --url GATEWAY --direct STANDIN --model SERVED_NAME`` compares the time
to the first token of ``/v1/responses`` (streamed) through the gateway naming a backend (the explicit path) with
the same request sent to the stand-in directly, interleaved, and prints the medians and their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import httpx
import openai

from loadtest.prompts import questions

PREFIX_CACHE = re.compile(r"^vllm:prefix_cache_(hits|queries)_total(?:\{[^}]*\})?\s+([0-9.eE+-]+)$", re.M)


@dataclass
class Turn:
    conversation: int
    turn: int
    backend: str | None
    reason: str | None
    ttft_s: float | None
    total_s: float
    prompt_tokens: int | None
    cached_tokens: int | None


async def one_conversation(client: openai.AsyncOpenAI, index: int, asks: Sequence[str], *, model: str,
                           max_tokens: int, session_header: str | None, tag: str | None = None) -> list[Turn]:
    messages: list[dict[str, Any]] = [{"role": "system", "content": f"Run {tag}."}] if tag else []
    turns = []
    headers = {session_header: f"loadtest-{index}"} if session_header else None
    for t, question in enumerate(asks, 1):
        messages.append({"role": "user", "content": question})
        start = time.perf_counter()
        raw = await client.chat.completions.with_raw_response.create(
            model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_headers=headers)
        first, text, usage = None, [], None
        async for chunk in raw.parse():  # type: ignore[attr-defined]
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter()
                text.append(chunk.choices[0].delta.content)
            if chunk.usage is not None:
                usage = chunk.usage
        details = getattr(usage, "prompt_tokens_details", None) if usage else None
        turns.append(Turn(index, t, raw.headers.get("x-router-backend"), raw.headers.get("x-router-reason"),
                          first - start if first else None, time.perf_counter() - start,
                          usage.prompt_tokens if usage else None,
                          getattr(details, "cached_tokens", None) if details else None))
        messages.append({"role": "assistant", "content": "".join(text)})
    return turns


def prefix_cache(urls: Sequence[str]) -> dict[str, float]:
    totals = {"hits": 0.0, "queries": 0.0}
    for url in urls:
        for kind, value in PREFIX_CACHE.findall(httpx.get(url, timeout=10).text):
            totals[kind] += float(value)
    return totals


def summarise(turns: Sequence[Turn]) -> dict[str, Any]:
    by_conversation: dict[int, list[Turn]] = {}
    for t in turns:
        by_conversation.setdefault(t.conversation, []).append(t)
    one_backend = sum(len({t.backend for t in ts}) == 1 for ts in by_conversation.values())
    later = [t for t in turns if t.turn > 1]
    first_backend = {c: ts[0].backend for c, ts in by_conversation.items()}
    kept = sum(t.backend == first_backend[t.conversation] for t in later)

    def median(values: list[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return round(statistics.median(present), 4) if present else None

    reasons: dict[str, int] = {}
    for t in turns:
        reasons[str(t.reason)] = reasons.get(str(t.reason), 0) + 1
    cached = [t for t in later if t.cached_tokens is not None and t.prompt_tokens]
    return {
        "conversations": len(by_conversation), "turns": len(turns),
        "share_conversations_on_one_backend": round(one_backend / max(len(by_conversation), 1), 3),
        "share_later_turns_on_first_backend": round(kept / max(len(later), 1), 3),
        "median_ttft_s_turn_1": median([t.ttft_s for t in turns if t.turn == 1]),
        "median_ttft_s_later_turns": median([t.ttft_s for t in later]),
        "cached_share_of_later_prompt_tokens": round(sum(t.cached_tokens or 0 for t in cached)
                                                     / sum(t.prompt_tokens or 0 for t in cached), 3)
        if cached else None,
        "reasons": reasons,
    }


async def run_conversations(args: argparse.Namespace) -> dict[str, Any]:
    asks = questions(args.conversations * args.turns, seed=args.seed)
    client = openai.AsyncOpenAI(base_url=args.url, api_key=args.api_key, max_retries=0, timeout=600)
    before = prefix_cache(args.metrics) if args.metrics else None
    slots = asyncio.Semaphore(args.concurrency)

    async def held(i: int) -> list[Turn]:
        async with slots:
            return await one_conversation(client, i, asks[i * args.turns:(i + 1) * args.turns], model=args.model,
                                          max_tokens=args.max_tokens, session_header=args.session_header,
                                          tag=args.tag)

    results = await asyncio.gather(*(held(i) for i in range(args.conversations)))
    turns = [t for ts in results for t in ts]
    summary = summarise(turns)
    if before is not None:
        after = prefix_cache(args.metrics)
        queries = after["queries"] - before["queries"]
        summary["prefix_cache"] = {"hits": after["hits"] - before["hits"], "queries": queries,
                                   "hit_rate": round((after["hits"] - before["hits"]) / queries, 3)
                                   if queries else None}
    return {"args": _args(args), "summary": summary,
            "turns": [asdict(t) for t in turns]}


def _args(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k not in ("api_key", "out")}


async def first_token_s(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> float:
    start = time.perf_counter()
    async with client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data:") and '"response.output_text.delta"' in line:
                return time.perf_counter() - start
    raise RuntimeError(f"{url}: no output text")


async def run_ttft(args: argparse.Namespace) -> dict[str, Any]:
    asks = questions(args.requests, seed=args.seed)
    times: dict[str, list[float]] = {"gateway": [], "direct": []}
    headers = {"authorization": f"Bearer {args.api_key}"}
    async with httpx.AsyncClient(timeout=600, headers=headers) as client:
        for i, question in enumerate(asks):
            body = {"model": args.model, "input": question, "max_output_tokens": 8, "stream": True,
                    "temperature": 0}
            order = ["gateway", "direct"] if i % 2 == 0 else ["direct", "gateway"]
            for where in order:
                base = args.url if where == "gateway" else args.direct
                times[where].append(await first_token_s(client, f"{base.rstrip('/')}/responses", body))
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {"args": _args(args),
            "median_ttft_s": {k: round(v, 4) for k, v in medians.items()},
            "ratio_gateway_to_direct": round(medians["gateway"] / medians["direct"], 3), "ttft_s": times}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.conversations", description=__doc__)
    parser.add_argument("mode", nargs="?", choices=["conversations", "ttft"], default="conversations")
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1", help="the gateway's base URL")
    parser.add_argument("--api-key", default="unused")
    parser.add_argument("--model", default="router")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--conversations", type=int, default=30)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--session-header", default=None, help="send this header with a per-conversation id")
    parser.add_argument("--tag", default=None, help="open every conversation with a system message naming this "
                        "run, so runs against the same backends share no prefix (a backend's prefix cache then "
                        "serves only the run that filled it)")
    parser.add_argument("--metrics", nargs="*", default=[], help="the backends' /metrics URLs")
    parser.add_argument("--direct", help="ttft: the stand-in's base URL")
    parser.add_argument("--requests", type=int, default=40, help="ttft: requests to each")
    parser.add_argument("--out", type=argparse.FileType("w"), default="-")
    args = parser.parse_args(argv)
    if args.mode == "ttft" and not args.direct:
        parser.error("ttft needs --direct (the stand-in's base URL) and --model (a backend's served name)")
    result = asyncio.run(run_ttft(args) if args.mode == "ttft" else run_conversations(args))
    json.dump(result, args.out, indent=1)
    args.out.write("\n")


if __name__ == "__main__":
    main()
