"""Micro-batching: worker threads run the local scorer's forward pass for requests that arrive close together.

Async callers ``await batcher.run(token_ids, key=...)``; a worker takes the first waiting request and gathers more
until the batch is full, or no request has joined for ``max_wait`` (a lone request waits only that long), or
``max_batch_wait`` has passed since the first (requests that keep arriving fill the batch, up to that), then runs
one forward pass and hands each caller its row.
The event loop only enqueues and awaits; the forward pass happens in a worker. With several workers, passes run
side by side, each on its own batch (torch releases the GIL inside its operations): on a CPU, two passes of one
thread each score more prompts a second than one pass on two threads (docs/benchmarks.md).

Keys share the scorer by tokens (``router.scorer.fair``): each key's requests wait in a queue of their own, and
batches are formed by deficit round robin over the keys with a quantum in tokens; a batch holds at most
``max_batch_tokens`` tokens (a longer prompt runs alone), so a pass another key's question waits behind stays
short. Full means ``max_batch_size`` prompts, or a next prompt that would take the batch over ``max_batch_tokens``.
One key alone is served first come, first served, as before.

When the work ahead of a request would take longer to score than the request may wait, the request is refused
at once (``overloaded``) instead of queueing only to time out: the caller routes it unscored straight away. The
work ahead is what the passes under way still have to do (by their tokens and how long they have run), and the
key's own backlog and, from each other key, as much as that at most (``FairQueue.ahead``), in tokens, times the
recent forward-pass time per token; shared among the workers. A key that floods the scorer is refused for its own
backlog, never for another key's. A queued request holds its token
ids only (4 bytes each), at most ``max_queue`` per key.

An early exit (``router.scorer.interface.EarlyExit``) travels with its request: a batch with one runs
``staged_features``, which may stop some prompts' passes at a shallower block.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from router.scorer.fair import FairQueue
from router.scorer.interface import BatchStats, EarlyExit, ScorerUnavailable

log = logging.getLogger(__name__)

TokenIds = Sequence[int]
# the time per token is averaged over about this many of the latest passes' tokens (a pass of 8 questions of ~110
# tokens weighs 0.2, one of 1,024 tokens 0.22, a lone question 0.03)
AVERAGE_TOKENS = 4096
Features = Callable[[Sequence[TokenIds]], np.ndarray]
# per prompt: (its features at its early exit or None, its configured features or None where its exit stopped it)
Staged = list[tuple[np.ndarray | None, np.ndarray | None]]
StagedFeatures = Callable[[Sequence[TokenIds], Sequence[EarlyExit | None]], Staged]


@dataclass(eq=False)
class _Job:
    ids: np.ndarray  # int32: a queued request holds 4 bytes a token
    key: str
    early: EarlyExit | None
    future: Future[tuple[np.ndarray | None, np.ndarray | None]]
    enqueued: float = field(default_factory=time.perf_counter)
    started: float | None = None

    @property
    def tokens(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class BatchResult:
    row: np.ndarray | None  # this request's features (None: its early exit stopped the pass)
    queue_s: float  # waiting for a batch slot
    early: np.ndarray | None = None  # its features at its early exit's layer, where it asked for one


class MicroBatcher:
    """Runs ``features(list_of_token_id_lists)`` in ``workers`` daemon threads, batching concurrent calls;
    ``worker_setup`` runs first in each (e.g. to set that thread's torch threads). ``staged(batch, exits)`` runs
    instead for a batch where a request asked for an early exit (without it, early exits are ignored).
    ``max_queue``: requests one key may have waiting; ``quantum_tokens``: the tokens a key's allowance grows by at
    each of its turns (the default: the largest prompt never waits more than one round)."""

    def __init__(
        self,
        features: Features,
        *,
        max_batch_size: int,
        max_wait_s: float,
        max_queue: int,
        max_batch_wait_s: float | None = None,
        on_batch: Callable[[BatchStats], None] | None = None,
        warmup: TokenIds | None = None,
        workers: int = 1,
        worker_setup: Callable[[], None] | None = None,
        max_batch_tokens: int | None = None,
        quantum_tokens: int = 1024,
        staged: StagedFeatures | None = None,
    ) -> None:
        self._features = features
        self._staged = staged
        self._max_batch = max_batch_size
        self._max_tokens = max_batch_tokens
        self._max_wait = max_wait_s
        self._max_batch_wait = max(max_wait_s, max_batch_wait_s if max_batch_wait_s is not None else max_wait_s)
        self._queue: FairQueue[_Job] = FairQueue(quantum_tokens, max_queue)
        self._lock = threading.Condition()
        self._on_batch = on_batch
        self._stopped = False
        # recent forward-pass seconds per token in one worker: a moving average weighted by tokens, so that the
        # long passes, which make most of a backlog's work, count for what they cost
        self._token_s: float | None = None
        self._running: dict[int, tuple[float, int]] = {}  # worker -> (start, tokens) of its pass under way
        self._warmup = warmup
        self._worker_setup = worker_setup
        self._threads = [threading.Thread(target=self._run, name=f"scorer-{i}", daemon=True) for i in range(workers)]
        for thread in self._threads:
            thread.start()

    async def run(self, ids: TokenIds, timeout_s: float | None = None, *, key: str = "",
                  early: EarlyExit | None = None) -> BatchResult:
        """``ids``' features (and early features, for ``early``), in ``key``'s share of the scorer."""
        job = _Job(np.asarray(ids, dtype=np.int32), key, early, Future())
        with self._lock:
            self._admit(key, job.tokens, timeout_s)
            if not self._queue.push(key, job, job.tokens):
                raise ScorerUnavailable("queue_full", "scorer queue is full")
            self._lock.notify()
        try:
            early_row, row = await asyncio.wait_for(asyncio.wrap_future(job.future), timeout_s)
        except TimeoutError as e:
            job.future.cancel()
            with self._lock:
                self._queue.remove(key, job)
            raise ScorerUnavailable("timeout", f"scorer took longer than {timeout_s:.1f}s") from e
        started = job.started if job.started is not None else time.perf_counter()
        return BatchResult(row, queue_s=started - job.enqueued, early=early_row)

    def admit(self, key: str, tokens: int, timeout_s: float | None) -> None:
        """Raise ScorerUnavailable at once where a request of ``key`` with ``tokens`` would not be scored within
        ``timeout_s`` (or the batcher is stopped). ``run`` checks it; a caller may check it before it tokenises,
        with a lower bound of the tokens, so that a request refused for its key's backlog costs no rendering."""
        with self._lock:
            self._admit(key, tokens, timeout_s)

    def _admit(self, key: str, tokens: int, timeout_s: float | None) -> None:
        if self._stopped:
            raise ScorerUnavailable("stopped", "scorer is stopped")
        if timeout_s is not None and (expected := self._expected(key, tokens)) > timeout_s:
            raise ScorerUnavailable("overloaded", f"the scorer's queue would take about {expected:.1f}s, "
                                    f"more than the {timeout_s:g}s a request may wait")

    def expected_wait_s(self, key: str = "", tokens: int = 1) -> float:
        """About how long a request of ``key`` with ``tokens`` queued now would wait for its score (0 until a pass
        has been timed)."""
        with self._lock:
            return self._expected(key, tokens)

    def _expected(self, key: str, tokens: int) -> float:
        per_token = self._token_s
        if per_token is None:
            return 0.0
        now = time.perf_counter()
        running = sum(max(0.0, tokens * per_token - (now - started)) for started, tokens in self._running.values())
        return (running + self._queue.ahead(key, tokens) * per_token) / len(self._threads)

    @property
    def alive(self) -> bool:
        return not self._stopped and all(thread.is_alive() for thread in self._threads)

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the workers (each finishes its batch first), then answer whatever is still queued with a clear
        error instead of leaving it waiting for ever."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            self._lock.notify_all()
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            queued = self._queue.drain()
        for job in queued:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(ScorerUnavailable("stopped", "scorer is stopped"))

    def _collect(self) -> list[_Job] | None:
        """The next batch (None once stopped): its first request in round-robin order, then more as they come."""
        with self._lock:
            while True:
                if self._stopped:
                    return None
                first = self._queue.pop()
                if first is not None:
                    break
                self._lock.wait()
            batch, tokens = [first], first.tokens
            joined = time.perf_counter()
            cap = joined + self._max_batch_wait
            while len(batch) < self._max_batch and not self._stopped:
                room = None if self._max_tokens is None else self._max_tokens - tokens
                job = self._queue.pop(room)
                if job is not None:
                    batch.append(job)
                    tokens += job.tokens
                    joined = time.perf_counter()
                    continue
                if len(self._queue):  # the next prompt would take the batch over max_batch_tokens: it is full
                    break
                remaining = min(joined + self._max_wait, cap) - time.perf_counter()
                if remaining <= 0:
                    break
                self._lock.wait(remaining)
            return batch

    def _warm_up(self, ids: TokenIds) -> None:
        """Two passes before the first request: the first pays torch's lazy set-up, the second is timed and
        seeds ``expected_wait_s`` (requests queue behind it meanwhile)."""
        try:
            self._features([ids])
            started = time.perf_counter()
            self._features([ids])
            self._token_s = (time.perf_counter() - started) / max(1, len(ids))
        except Exception:
            log.exception("scorer warm-up failed")

    def _pass(self, batch: list[_Job]) -> Staged:
        ids = [job.ids.tolist() for job in batch]
        if self._staged is not None and any(job.early is not None for job in batch):
            return self._staged(ids, [job.early for job in batch])
        return [(None, row) for row in self._features(ids)]

    def _run(self) -> None:
        if self._worker_setup is not None:
            self._worker_setup()
        if self._warmup is not None:
            self._warm_up(self._warmup)
        while (batch := self._collect()) is not None:
            batch = [job for job in batch if job.future.set_running_or_notify_cancel()]
            if not batch:
                continue
            tokens = sum(job.tokens for job in batch)
            started = time.perf_counter()
            with self._lock:
                self._running[threading.get_ident()] = (started, tokens)
            for job in batch:
                job.started = started
            try:
                results = self._pass(batch)
            except Exception as e:  # one bad batch must not kill the worker
                log.exception("scorer forward pass failed")
                for job in batch:
                    job.future.set_exception(ScorerUnavailable("failed", f"scorer failed: {e}"))
                continue
            finally:
                with self._lock:
                    del self._running[threading.get_ident()]
            elapsed = time.perf_counter() - started
            per_token = elapsed / max(1, tokens)
            weight = 1 - math.exp(-tokens / AVERAGE_TOKENS)
            self._token_s = per_token if self._token_s is None else (1 - weight) * self._token_s + weight * per_token
            if self._on_batch is not None:
                stopped = sum(1 for job, (_, row) in zip(batch, results, strict=True) if job.early and row is None)
                self._on_batch(BatchStats(len(batch), elapsed, tokens=tokens, stopped=stopped))
            for job, result in zip(batch, results, strict=True):
                job.future.set_result(result)
