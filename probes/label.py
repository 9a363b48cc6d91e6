"""``python -m probes label``: ask every backend of a config every question of a dataset, grade the answers
and keep per question and backend: correctness, tokens, cost and latency.

Two files come out. ``OUT.results.jsonl`` is the append-only log, one line per (question, backend), written as
each answer arrives; a restarted run reads it and skips the pairs already there, so nothing finished is redone
or lost. ``OUT`` is the dataset itself with ``correct`` / ``tokens`` / ``cost`` / ``latency_s`` as
``{model: value}`` (the layout ``train`` and ``eval`` read), rewritten from the log at the end of every run.

With ``samples`` K > 1 each question is asked K times (at ``temperature``); each answer is a line of the log
(``run`` ``kK_TT``, ``sample`` 0..K-1), and a question with all K answers gets ``success_rate`` as
``{"MODEL@kK_TT": share right}``, the graded label ``train --train-labels BACKEND=MODEL@kK_TT`` learns from.
Such a run leaves ``correct`` (one answer a question, the labels every metric reads) to a run without it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from openai import AsyncOpenAI, Timeout
from tqdm import tqdm

from probes.data import Dataset
from probes.grading import extract_answer, get_grader
from router import BackendConfig, Settings
from router import request_cost as price

log = logging.getLogger(__name__)


def question_key(question: str) -> str:
    """A stable id for a question: the start of the SHA-256 of its text."""
    return hashlib.sha256(question.encode()).hexdigest()[:16]


def results_path(out: Path) -> Path:
    return out.with_name(out.name.removesuffix(".jsonl") + ".results.jsonl")


def request_cost(backend: BackendConfig, prompt_tokens: int, completion_tokens: int) -> float:
    """US dollars for one call at the backend's per-million-token prices (the gateway's own formula)."""
    return price(backend.input_cost_per_mtok, backend.output_cost_per_mtok, prompt_tokens, completion_tokens)


def read_results(path: Path) -> list[dict[str, Any]]:
    """The log's complete lines; a torn last line (a run killed mid-write) is cut off the file."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        log.warning("%s: dropping an unfinished last line", path)
        with path.open("r+b") as f:
            f.truncate(cut)
        data = data[:cut]
    rows = []
    for n, line in enumerate(data.decode().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s:%d: skipping a line that is not JSON", path, n)
    return rows


@dataclass
class LabelSummary:
    done_before: int = 0
    done_now: int = 0
    failed: int = 0
    per_backend: dict[str, dict[str, float]] = field(default_factory=dict)
    out: Path | None = None
    results: Path | None = None


class _Log:
    """Appends one JSON line per finished answer and flushes it at once."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = path.open("a", encoding="utf-8")

    def write(self, row: dict[str, Any]) -> None:
        self._f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


def _client(backend: BackendConfig, retries: int) -> AsyncOpenAI:
    timeout = Timeout(backend.read_timeout_s, connect=backend.connect_timeout_s)  # openai's own (httpx or httpx2)
    return AsyncOpenAI(base_url=str(backend.base_url), api_key=backend.api_key() or "none", timeout=timeout,
                       max_retries=retries)


def sampled_run(samples: int, temperature: float) -> str | None:
    """The name of a run of ``samples`` answers a question (``k8_T0.7``); None for one answer a question."""
    return None if samples == 1 else f"k{samples}_T{temperature:g}"


async def _ask(
    client: AsyncOpenAI, backend: BackendConfig, record: dict[str, Any], idx: int, *, max_tokens: int,
    temperature: float, grader: str, system: str | None,
) -> dict[str, Any]:
    messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": record["question"]})
    start = time.perf_counter()
    reply = await client.chat.completions.create(
        model=backend.model, messages=messages, max_tokens=max_tokens, temperature=temperature,  # type: ignore[arg-type]
    )
    latency = time.perf_counter() - start
    text = (reply.choices[0].message.content or "") if reply.choices else ""
    usage = reply.usage
    prompt_tokens = int(usage.prompt_tokens) if usage else 0
    completion_tokens = int(usage.completion_tokens) if usage else 0
    return {
        "key": question_key(record["question"]),
        "idx": record.get("idx", idx),
        "backend": backend.name,
        "model": backend.model,
        "correct": int(get_grader(grader)(text, str(record.get("answer", "")))),
        "extracted": extract_answer(text),
        "gold": str(record.get("answer", "")),
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "cost": request_cost(backend, prompt_tokens, completion_tokens),
        "latency_s": round(latency, 4),
        "finish_reason": reply.choices[0].finish_reason if reply.choices else None,
        "grader": grader,
        "completion": text,
    }


def merge(dataset: Dataset, rows: Sequence[dict[str, Any]], limit: int | None = None) -> list[dict[str, Any]]:
    """The dataset's records (the first ``limit``) with each logged result folded in by model name; records
    with no result at all are left out."""
    by_key: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_key.setdefault(row["key"], []).append(row)
    merged = []
    for record in dataset.records[:limit]:
        found = by_key.get(question_key(record["question"]))
        if not found:
            continue
        out = dict(record)
        for name in ("correct", "tokens", "cost", "latency_s", "success_rate"):
            out[name] = dict(out.get(name) or {})
        sampled: dict[tuple[str, str], dict[int, int]] = {}
        for row in found:
            model = row["model"]
            if row.get("run"):
                sampled.setdefault((f"{model}@{row['run']}", row["run"]), {})[row["sample"]] = row["correct"]
                continue
            out["correct"][model] = row["correct"]
            out["tokens"][model] = {"prompt": row["prompt_tokens"], "completion": row["completion_tokens"]}
            out["cost"][model] = row["cost"]
            out["latency_s"][model] = row["latency_s"]
        for (name, run), answers in sampled.items():
            if len(answers) == int(run.split("_")[0][1:]):  # all K answers in: a rate over fewer would be noisier
                out["success_rate"][name] = sum(answers.values()) / len(answers)
        if not out["success_rate"]:
            del out["success_rate"]
        merged.append(out)
    return merged


def write_merged(path: Path, records: Sequence[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    tmp.replace(path)


async def label_dataset(
    settings: Settings, dataset: Dataset, out: Path, *, backends: Sequence[str] | None = None,
    limit: int | None = None, concurrency: int = 8, max_tokens: int = 3000, temperature: float = 0.0,
    grader: str = "math", system: str | None = None, retries: int = 2, progress: bool = True, samples: int = 1,
) -> LabelSummary:
    """Label the first ``limit`` questions of ``dataset`` on ``backends`` (default: all), ``samples`` answers
    a question, ``concurrency`` requests in flight per backend, resuming from ``out``'s results log."""
    get_grader(grader)  # fail early on an unknown name
    if samples < 1:
        raise ValueError("samples must be at least 1")
    run = sampled_run(samples, temperature)
    chosen = [b for b in settings.backends if backends is None or b.name in backends]
    if backends is not None and (unknown := set(backends) - {b.name for b in chosen}):
        raise ValueError(f"no backend named {', '.join(sorted(unknown))} in the config")
    log_path = results_path(out)
    previous = read_results(log_path)
    done = {(r["key"], r["backend"], r.get("run"), r.get("sample", 0)) for r in previous}
    records = dataset.records[:limit]
    todo = [(i, r, b, k) for b in chosen for i, r in enumerate(records) for k in range(samples)
            if (question_key(r["question"]), b.name, run, k) not in done]
    summary = LabelSummary(done_before=len(records) * len(chosen) * samples - len(todo), out=out,
                           results=log_path)
    writer = _Log(log_path)
    clients = {b.name: _client(b, retries) for b in chosen}
    gates = {b.name: asyncio.Semaphore(concurrency) for b in chosen}
    bar = tqdm(total=len(todo), desc="label", unit="answer", disable=not progress)
    right = {b.name: [0, 0] for b in chosen}  # answered now: [right, answered], shown beside the bar

    async def one(i: int, record: dict[str, Any], backend: BackendConfig, sample: int) -> None:
        async with gates[backend.name]:
            try:
                row = await _ask(clients[backend.name], backend, record, i, max_tokens=max_tokens,
                                 temperature=temperature, grader=grader, system=system)
                if run is not None:
                    row |= {"run": run, "sample": sample}
                right[backend.name][0] += row["correct"]
                right[backend.name][1] += 1
            except Exception as e:  # one failed request must not stop the run; it is retried next time
                summary.failed += 1
                log.warning("%s, question %d: %s", backend.name, i, e)
                return
            finally:
                if progress:
                    bar.set_postfix_str(", ".join(f"{n} {r}/{a} right" for n, (r, a) in right.items())
                                        + (f", {summary.failed} failed" if summary.failed else ""), refresh=False)
                bar.update(1)
        writer.write(row)
        summary.done_now += 1

    try:
        await asyncio.gather(*(one(i, r, b, k) for i, r, b, k in todo))
    finally:
        bar.close()
        writer.close()
        for client in clients.values():
            await client.close()
        rows = read_results(log_path)
        write_merged(out, merge(dataset, rows, limit))
        for b in chosen:
            mine = [r for r in rows if r["backend"] == b.name and r.get("run") == run]
            if mine:
                summary.per_backend[b.name] = {
                    "answered": len(mine),
                    "right": sum(r["correct"] for r in mine),
                    "accuracy": sum(r["correct"] for r in mine) / len(mine),
                    "prompt_tokens": sum(r["prompt_tokens"] for r in mine),
                    "completion_tokens": sum(r["completion_tokens"] for r in mine),
                    "cost": sum(r["cost"] for r in mine),
                    "mean_cost": sum(r["cost"] for r in mine) / len(mine),
                    "mean_latency_s": sum(r["latency_s"] for r in mine) / len(mine),
                }
    return summary
