"""``python -m probes label`` against a tiny OpenAI-compatible server on 127.0.0.1: grading, costs, and a run
killed half-way that resumes without redoing or losing finished answers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI, Request

from probes.data import load_dataset
from probes.label import label_dataset, merge, question_key, read_results, results_path
from router.config import load_settings

ROOT = Path(__file__).resolve().parents[2]
N = 10
BLOCK_FROM = 6  # the small model hangs on questions 6… while `blocked` is set


class FakeBackends:
    """Both backends in one app: 'small' is right on even questions, 'big' always; 'small' hangs on demand."""

    def __init__(self) -> None:
        self.app = FastAPI()
        self.requests: Counter[tuple[str, str]] = Counter()
        self.blocked = threading.Event()
        self.app.post("/v1/chat/completions")(self.complete)

    async def complete(self, request: Request) -> dict:
        body = await request.json()
        model, question = body["model"], body["messages"][-1]["content"]
        self.requests[(model, question)] += 1
        i = int(question.split(":")[0][1:])
        while model == "small" and i >= BLOCK_FROM and self.blocked.is_set():  # noqa: ASYNC110 (set by the test thread)
            await asyncio.sleep(0.02)
        right = model == "big" or i % 2 == 0
        text = f"Step by step, {i} plus one is {i + 1}. \\boxed{{{i + 1 if right else i + 7}}}"
        return {
            "id": f"c{i}", "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 100, "completion_tokens": 10 + i, "total_tokens": 110 + i},
        }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server() -> Iterator[tuple[FakeBackends, int]]:
    fake = FakeBackends()
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(fake.app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started:
        assert time.monotonic() < deadline, "test server did not start"
        time.sleep(0.02)
    yield fake, port
    fake.blocked.clear()
    srv.should_exit = True
    thread.join(timeout=10)


def write_inputs(tmp_path: Path, port: int) -> tuple[Path, Path]:
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps({"idx": i, "question": f"Q{i}: what is {i} plus one?", "answer": str(i + 1)})
                            + "\n" for i in range(N)))
    config = tmp_path / "config.yaml"
    config.write_text(f"""\
backends:
  - name: small-one
    base_url: http://127.0.0.1:{port}/v1
    model: small
    input_cost_per_mtok: 1.0
    output_cost_per_mtok: 2.0
    probe: small.json
  - name: big-one
    base_url: http://127.0.0.1:{port}/v1
    model: big
    input_cost_per_mtok: 4.0
    output_cost_per_mtok: 8.0
    probe: big.json
""")
    return data, config


def run_label(data: Path, config: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, "-m", "probes", "label", "--config", str(config), "--data", str(data), "--out", str(out),
         "--concurrency", "2", "--no-progress", *extra],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )


def test_killed_run_resumes_without_redoing_or_losing_work(tmp_path: Path, server) -> None:
    fake, port = server
    data, config = write_inputs(tmp_path, port)
    out = tmp_path / "labels.jsonl"
    log = results_path(out)
    fake.blocked.set()
    proc = run_label(data, config, out)
    try:
        want = BLOCK_FROM + N  # small 0–5 and big 0–9 finish; small 6… hang
        deadline = time.monotonic() + 60
        while not (log.is_file() and log.read_text().count("\n") >= want):
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            assert time.monotonic() < deadline, "the first run did not get far enough"
            time.sleep(0.05)
        time.sleep(0.2)  # give a (wrong) extra write a chance to show
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    first = read_results(log)
    assert len(first) == want
    assert {(r["backend"], r["idx"]) for r in first} == (
        {("small-one", i) for i in range(BLOCK_FROM)} | {("big-one", i) for i in range(N)})
    # a run killed mid-write leaves a torn line: the restart must cut it off, not choke on it
    with log.open("a") as f:
        f.write('{"key": "torn')

    fake.blocked.clear()
    fake.requests.clear()
    proc = run_label(data, config, out)
    output = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == 0, output
    assert "4 answered now, 16 done before, 0 failed" in output
    # only the unfinished pairs were asked again, each once
    assert fake.requests == Counter({("small", f"Q{i}: what is {i} plus one?"): 1 for i in range(BLOCK_FROM, N)})

    rows = read_results(log)
    assert len(rows) == 2 * N
    assert rows[:want] == first  # append-only: nothing finished was rewritten
    merged = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["idx"] for r in merged] == list(range(N))
    for r in merged:
        i = r["idx"]
        assert r["correct"] == {"small": int(i % 2 == 0), "big": 1}
        assert r["tokens"]["big"] == {"prompt": 100, "completion": 10 + i}
        assert r["cost"]["small"] == pytest.approx((100 * 1.0 + (10 + i) * 2.0) / 1e6)
        assert r["cost"]["big"] == pytest.approx((100 * 4.0 + (10 + i) * 8.0) / 1e6)
        assert r["latency_s"]["big"] >= 0
    # the output is a dataset train/eval read: labels by served model name
    ds = load_dataset(out)
    assert ds.labels("small").tolist() == [int(i % 2 == 0) for i in range(N)]


def test_limit_and_backend_filter_in_process(tmp_path: Path, server) -> None:
    fake, port = server
    data, config = write_inputs(tmp_path, port)
    out = tmp_path / "labels.jsonl"
    settings, dataset = load_settings(config), load_dataset(data)
    summary = asyncio.run(label_dataset(settings, dataset, out, backends=["big-one"], limit=3, progress=False))
    assert (summary.done_now, summary.done_before, summary.failed) == (3, 0, 0)
    assert summary.per_backend["big-one"]["accuracy"] == 1.0
    again = asyncio.run(label_dataset(settings, dataset, out, backends=["big-one"], limit=3, progress=False))
    assert (again.done_now, again.done_before) == (0, 3)
    assert sum(fake.requests.values()) == 3
    assert {r["key"] for r in read_results(results_path(out))} == {
        question_key(f"Q{i}: what is {i} plus one?") for i in range(3)}
    with pytest.raises(ValueError, match="no backend named"):
        asyncio.run(label_dataset(settings, dataset, out, backends=["nope"], progress=False))


def test_failed_requests_are_retried_next_run(tmp_path: Path) -> None:
    data, config = write_inputs(tmp_path, free_port())  # nothing listens there
    out = tmp_path / "labels.jsonl"
    settings = load_settings(config)
    summary = asyncio.run(label_dataset(settings, load_dataset(data), out, limit=2, retries=0, progress=False))
    assert (summary.done_now, summary.failed) == (0, 4)
    assert read_results(results_path(out)) == []


def test_sampled_answers_become_a_graded_label(tmp_path: Path, server) -> None:
    """--samples K: K answers a question, each a line of the log, resumable like the rest; a question with all K
    in gets success_rate[MODEL@kK_TT], which training reads; a run of one answer a question keeps `correct`."""
    fake, port = server
    data, config = write_inputs(tmp_path, port)
    out = tmp_path / "labels.jsonl"
    settings, dataset = load_settings(config), load_dataset(data)
    greedy = asyncio.run(label_dataset(settings, dataset, out, backends=["small-one"], limit=4, progress=False))
    assert greedy.done_now == 4
    sampled = asyncio.run(label_dataset(settings, dataset, out, backends=["small-one"], limit=4, samples=3,
                                        temperature=0.7, progress=False))
    assert (sampled.done_now, sampled.done_before, sampled.failed) == (12, 0, 0)
    assert fake.requests == Counter({("small", f"Q{i}: what is {i} plus one?"): 4 for i in range(4)})
    again = asyncio.run(label_dataset(settings, dataset, out, backends=["small-one"], limit=4, samples=3,
                                      temperature=0.7, progress=False))
    assert (again.done_now, again.done_before) == (0, 12)
    rows = [r for r in read_results(results_path(out)) if r.get("run")]
    assert sorted((r["idx"], r["sample"]) for r in rows) == [(i, k) for i in range(4) for k in range(3)]
    assert {r["run"] for r in rows} == {"k3_T0.7"}
    merged = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["success_rate"] for r in merged] == [{"small@k3_T0.7": float(i % 2 == 0)} for i in range(4)]
    assert [r["correct"] for r in merged] == [{"small": int(i % 2 == 0)} for i in range(4)]
    labelled = load_dataset(out)
    assert labelled.training_labels("small@k3_T0.7").tolist() == [1.0, 0.0, 1.0, 0.0]
    # a question with fewer than K answers logged gets no rate yet (it would be a noisier one under the same name)
    partial = [r for r in read_results(results_path(out)) if not (r.get("run") and r["idx"] == 3 and r["sample"] == 2)]
    folded = merge(dataset, partial, limit=4)
    assert [("success_rate" in r) for r in folded] == [True, True, True, False]
    assert folded[3]["correct"] == {"small": 0}


def test_output_is_a_progress_bar_and_a_summary_not_a_line_per_request(tmp_path: Path, server) -> None:
    """At the default log level the HTTP clients' one INFO line per request stays out: a progress bar counts the
    answers (right so far per backend), and one line per backend sums them up."""
    _, port = server
    data, config = write_inputs(tmp_path, port)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "probes", "label", "--config", str(config), "--data", str(data), "--out",
         str(tmp_path / "labels.jsonl"), "--concurrency", "2"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    output = proc.stdout + proc.stderr
    assert "HTTP Request" not in output and " INFO " not in output
    assert "label: 100%" in proc.stderr and "small-one 5/10 right" in proc.stderr  # the bar's last state
    lines = [line for line in output.replace("\r", "\n").splitlines() if line.strip() and "label:" not in line]
    assert len(lines) <= 3, output  # the run's line and one per backend
    assert "  small-one: 5/10 right (50.0%), 1,000 prompt + 145 completion tokens, $0.001290" in proc.stdout
    assert "  big-one: 10/10 right (100.0%)" in proc.stdout
