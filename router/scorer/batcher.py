"""Micro-batching: worker threads run the local scorer's forward pass for requests that arrive close together.

Async callers ``await batcher.run(token_ids)``; a worker takes the first waiting request and gathers more
until the batch is full, or no request has joined for ``max_wait`` (a lone request waits only that long), or
``max_batch_wait`` has passed since the first (requests that keep arriving fill the batch, up to that), then runs
one forward pass and hands each caller its row.
The event loop only enqueues and awaits; the forward pass happens in a worker. With several workers, passes run
side by side, each on its own batch (torch releases the GIL inside its operations): on a CPU, two passes of one
thread each score more prompts a second than one pass on two threads (docs/benchmarks.md).

When the queue ahead of a request would take longer to score than the request may wait, the request is refused
at once (``overloaded``) instead of queueing only to time out: the caller routes it unscored straight away.
The estimate is the queue length times the recent forward-pass time per prompt, shared among the workers.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from router.scorer.interface import BatchStats, ScorerUnavailable

log = logging.getLogger(__name__)

TokenIds = Sequence[int]


@dataclass
class _Job:
    ids: TokenIds
    future: Future[np.ndarray]
    enqueued: float = field(default_factory=time.perf_counter)
    started: float | None = None


@dataclass(frozen=True)
class BatchResult:
    row: np.ndarray  # this request's features
    queue_s: float  # waiting for a batch slot


class MicroBatcher:
    """Runs ``features(list_of_token_id_lists)`` in ``workers`` daemon threads, batching concurrent calls;
    ``worker_setup`` runs first in each (e.g. to set that thread's torch threads)."""

    def __init__(
        self,
        features: Callable[[Sequence[TokenIds]], np.ndarray],
        *,
        max_batch_size: int,
        max_wait_s: float,
        max_queue: int,
        max_batch_wait_s: float | None = None,
        on_batch: Callable[[BatchStats], None] | None = None,
        warmup: TokenIds | None = None,
        workers: int = 1,
        worker_setup: Callable[[], None] | None = None,
    ) -> None:
        self._features = features
        self._max_batch = max_batch_size
        self._max_wait = max_wait_s
        self._max_batch_wait = max(max_wait_s, max_batch_wait_s if max_batch_wait_s is not None else max_wait_s)
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=max_queue)
        self._on_batch = on_batch
        self._stopped = False
        self._prompt_s: float | None = None  # recent forward-pass seconds per prompt in one worker (moving average)
        self._warmup = warmup
        self._worker_setup = worker_setup
        self._threads = [threading.Thread(target=self._run, name=f"scorer-{i}", daemon=True) for i in range(workers)]
        for thread in self._threads:
            thread.start()

    async def run(self, ids: TokenIds, timeout_s: float | None = None) -> BatchResult:
        if self._stopped:
            raise ScorerUnavailable("stopped", "scorer is stopped")
        if timeout_s is not None and (expected := self.expected_wait_s()) > timeout_s:
            raise ScorerUnavailable("overloaded", f"the scorer's queue would take about {expected:.1f}s, "
                                    f"more than the {timeout_s:g}s a request may wait")
        job = _Job(ids, Future())
        try:
            self._queue.put_nowait(job)
        except queue.Full as e:
            raise ScorerUnavailable("queue_full", "scorer queue is full") from e
        try:
            features = await asyncio.wait_for(asyncio.wrap_future(job.future), timeout_s)
        except TimeoutError as e:
            job.future.cancel()
            raise ScorerUnavailable("timeout", f"scorer took longer than {timeout_s:.1f}s") from e
        started = job.started if job.started is not None else time.perf_counter()
        return BatchResult(features, queue_s=started - job.enqueued)

    def expected_wait_s(self) -> float:
        """About how long a request queued now would wait for its score (0 until a pass has been timed)."""
        per_prompt = self._prompt_s
        return 0.0 if per_prompt is None else (self._queue.qsize() + 1) * per_prompt / len(self._threads)

    @property
    def alive(self) -> bool:
        return not self._stopped and all(thread.is_alive() for thread in self._threads)

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the workers (each finishes its batch and takes one stop mark), then answer whatever is still
        queued with a clear error instead of leaving it waiting for ever."""
        if self._stopped:
            return
        self._stopped = True
        for _ in self._threads:
            self._queue.put(None)
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        marks = 0  # stop marks of workers still in a pass: put back for them
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                marks += 1
            elif job.future.set_running_or_notify_cancel():
                job.future.set_exception(ScorerUnavailable("stopped", "scorer is stopped"))
        for _ in range(marks):
            self._queue.put_nowait(None)

    def _collect(self, first: _Job) -> tuple[list[_Job], bool]:
        batch = [first]
        joined = time.perf_counter()
        cap = joined + self._max_batch_wait
        while len(batch) < self._max_batch:
            now = time.perf_counter()
            remaining = min(joined + self._max_wait, cap) - now
            try:
                job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return batch, True
            batch.append(job)
            joined = time.perf_counter()
        return batch, False

    def _warm_up(self, ids: TokenIds) -> None:
        """Two passes before the first request: the first pays torch's lazy set-up, the second is timed and
        seeds ``expected_wait_s`` (requests queue behind it meanwhile)."""
        try:
            self._features([ids])
            started = time.perf_counter()
            self._features([ids])
            self._prompt_s = time.perf_counter() - started
        except Exception:
            log.exception("scorer warm-up failed")

    def _run(self) -> None:
        if self._worker_setup is not None:
            self._worker_setup()
        if self._warmup is not None:
            self._warm_up(self._warmup)
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                break
            batch, stop = self._collect(first)
            batch = [job for job in batch if job.future.set_running_or_notify_cancel()]
            if not batch:
                continue
            started = time.perf_counter()
            for job in batch:
                job.started = started
            try:
                rows = self._features([job.ids for job in batch])
            except Exception as e:  # one bad batch must not kill the worker
                log.exception("scorer forward pass failed")
                for job in batch:
                    job.future.set_exception(ScorerUnavailable("failed", f"scorer failed: {e}"))
                continue
            elapsed = time.perf_counter() - started
            per_prompt = elapsed / len(batch)
            self._prompt_s = per_prompt if self._prompt_s is None else 0.8 * self._prompt_s + 0.2 * per_prompt
            if self._on_batch is not None:
                self._on_batch(BatchStats(len(batch), elapsed))
            for job, row in zip(batch, rows, strict=True):
                job.future.set_result(row)
