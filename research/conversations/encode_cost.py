"""What each conversation view costs the gateway before the forward pass: rendering and tokenising (the
``PromptEncoder.encode`` of every request), timed side by side on the conversations of ``measure.py``, and the
tokens the forward pass then reads.

    .venv/bin/python -m research.conversations.encode_cost [--questions 100 --repeat 5]

Prints, per kind of conversation and view, the median milliseconds per encode and the mean prompt tokens. The
views are timed interleaved (round robin over the repeats), so they share whatever else the machine is doing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from research.conversations.measure import CALC, DATA, ROOT, build
from router import load_settings
from router.scorer import CONVERSATION_VIEWS, PromptEncoder, resolve_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    rows = [json.loads(line) for line in DATA.open()]
    asked, pool = rows[:args.questions], [r for r in rows[args.questions:] if CALC.search(r["solution"])]
    cfg = load_settings(ROOT / "config.yaml").scorer
    folder = resolve_model(cfg.model, cfg.cache_dir).path
    encoders = {v: PromptEncoder(folder, cfg.max_prompt_tokens, conversation=v, context_tokens=cfg.context_tokens)
                for v in CONVERSATION_VIEWS}
    conversations: dict[str, list[list[dict]]] = {}
    for row in asked:
        for kind, conv in build(row, pool, seed=row["idx"]).items():
            conversations.setdefault(kind, []).append(conv.messages)
    times: dict[tuple[str, str], list[float]] = {}
    tokens: dict[tuple[str, str], list[int]] = {}
    for _ in range(args.repeat):
        for kind, convs in conversations.items():
            for view, encoder in encoders.items():
                for messages in convs:
                    start = time.perf_counter()
                    ids = encoder.encode(messages)
                    times.setdefault((kind, view), []).append(time.perf_counter() - start)
                    tokens.setdefault((kind, view), []).append(len(ids))
    print(f"context_tokens={cfg.context_tokens}, max_prompt_tokens={cfg.max_prompt_tokens}")
    print("| conversation | view | median ms per encode | mean tokens read |\n|---|---|---|---|")
    for (kind, view), t in sorted(times.items()):
        print(f"| {kind} | {view} | {statistics.median(t) * 1000:.2f} | {statistics.mean(tokens[(kind, view)]):.0f} |")


if __name__ == "__main__":
    main()
