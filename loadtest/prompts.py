"""Request bodies from the GSM8K questions in ``data/gsm8k_test_qwen25math.jsonl`` (or another file's)."""

from __future__ import annotations

import random
from pathlib import Path

import orjson

DATA = Path(__file__).resolve().parent.parent / "data" / "gsm8k_test_qwen25math.jsonl"


def questions(n: int, seed: int = 0, data: Path = DATA) -> list[str]:
    """``n`` questions of ``data`` (a JSONL file with a "question" field: GSM8K test by default) drawn at random
    (fixed seed), so prompt lengths follow the data set's."""
    rows = [orjson.loads(line)["question"] for line in data.read_bytes().splitlines() if line.strip()]
    return random.Random(seed).sample(rows, min(n, len(rows)))


def median_question() -> str:
    rows = sorted(questions(10_000), key=len)
    return rows[len(rows) // 2]


def chat_body(model: str, question: str, stream: bool = False) -> bytes:
    body: dict[str, object] = {"model": model, "messages": [{"role": "user", "content": question}],
                               "max_tokens": 16}
    if stream:
        body["stream"] = True
    return orjson.dumps(body)
