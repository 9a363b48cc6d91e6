"""Micro-batching: worker threads run the local scorer's forward pass for requests that arrive close together.

Async callers ``await batcher.run(token_ids, key=...)``; a worker takes the first waiting request and gathers more
until the batch is full, or no request has joined for ``max_wait`` (a lone request waits only that long), or
``max_batch_wait`` has passed since the first (requests that keep arriving fill the batch, up to that), then runs
one forward pass and hands each caller its row.
The event loop only enqueues and awaits; the forward pass happens in a worker. With several workers, passes run
side by side, each on its own batch (torch releases the GIL inside its operations): on a CPU, two passes of one
thread each score more prompts a second than one pass on two threads (research/perf/README.md).

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

A pass cannot be interrupted, so a request waits for the one under way. With ``chunk_tokens``, a prompt longer than
``chunk_above_tokens`` (shorter ones run whole, batched as without chunks) is scored in chunks of that many tokens
(``router.scorer.interface.Chunk``), one pass each, and other requests' passes run between them: the prompt is one
item of its key's queue whose cost is its next chunk's tokens, and after each chunk it goes back to the front of its
key's queue (its place there and in the round robin kept), its keys and values kept with it (``Chunk.state``). A
batch that holds a chunk holds at most ``chunk_tokens`` tokens, and a key's turn at most ``chunk_tokens`` (the
quantum): while long prompts are scored, a request waits for about one chunk's pass, then runs in a pass of its own
size. A prompt's chunks run in order, one at a time (it is in the queue or in one worker's pass, never both); a
request that timed out or was cancelled drops its prompt's state at the next chunk boundary, and its later chunks
never run. A chunked prompt takes no early exit (it is scored in full).
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
from router.scorer.interface import BatchStats, Chunk, EarlyExit, ScorerUnavailable

log = logging.getLogger(__name__)

TokenIds = Sequence[int]
# the time per token is averaged over about this many of the latest passes' tokens (a pass of 8 questions of ~110
# tokens weighs 0.2, one of 1,024 tokens 0.22, a lone question 0.03)
AVERAGE_TOKENS = 4096
Features = Callable[[Sequence[TokenIds]], np.ndarray]
# per prompt: (its features at its early exit or None, its configured features or None where its exit stopped it)
Staged = list[tuple[np.ndarray | None, np.ndarray | None]]
CONTENDED_S = 1.0  # another key asked this recently: a flooding key's prompts over chunk_tokens go in chunks

# a batch's prompts may be chunks of long ones (``chunk_tokens``); a chunk has no exit, and (None, None) unless last
StagedFeatures = Callable[[Sequence[TokenIds | Chunk], Sequence[EarlyExit | None]], Staged]


@dataclass(eq=False)
class _Job:
    ids: np.ndarray  # int32: a queued request holds 4 bytes a token
    key: str
    early: EarlyExit | None
    future: Future[tuple[np.ndarray | None, np.ndarray | None]]
    enqueued: float = field(default_factory=time.perf_counter)
    started: float | None = None
    chunk: Chunk | None = None  # a long prompt scored in chunks: its next one (and the pass's state so far)
    opened: bool = False  # its first chunk was taken: it counts in the batcher's open prompts until it ends

    @property
    def tokens(self) -> int:
        return len(self.ids)

    @property
    def cost(self) -> int:
        """The tokens of its next pass."""
        return self.chunk.end - self.chunk.start if self.chunk is not None else len(self.ids)

    @property
    def later(self) -> int:
        """Its tokens after its next pass."""
        return len(self.ids) - self.chunk.end if self.chunk is not None else 0

    @property
    def partial(self) -> bool:
        """Its next pass is a chunk that is not its prompt's last."""
        return self.later > 0

    def piece(self) -> TokenIds | Chunk:
        return self.chunk if self.chunk is not None else self.ids.tolist()


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
    each of its turns (the default: the largest prompt never waits more than one round; with ``chunk_tokens``,
    ``chunk_tokens``). ``chunk_tokens``: score a prompt longer than ``chunk_above_tokens`` (default: than
    ``chunk_tokens``) in chunks of that many tokens, through ``staged`` (which must be given and take ``Chunk``
    pieces); ``max_open_chunked``: at most so many long prompts partway
    through their chunks (each keeping its keys and values) at once, over all keys; another waits in its queue,
    its key's turn passed on, until one ends."""

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
        quantum_tokens: int | None = None,
        staged: StagedFeatures | None = None,
        chunk_tokens: int | None = None,
        chunk_above_tokens: int | None = None,
        max_open_chunked: int = 8,
    ) -> None:
        if chunk_tokens is not None and (chunk_tokens < 1 or staged is None):
            raise ValueError("chunk_tokens must be positive, and the staged pass given to run chunks")
        if max_open_chunked < 1:
            raise ValueError("max_open_chunked must be positive")
        self._features = features
        self._staged = staged
        self._chunk = chunk_tokens
        # a prompt longer than this is scored in chunks; shorter ones run whole (and batch as without chunks)
        self._chunk_above = max(chunk_above_tokens or 0, chunk_tokens or 0)
        self._flood_tokens = max_batch_tokens or 1024  # a key with this many tokens waiting floods the scorer
        self._seen: dict[str, float] = {}  # key -> when it last asked (monotonic), for ``_chunked``
        self._max_open = max_open_chunked
        self._open = 0  # long prompts whose first chunk was taken and whose state is kept (``_Job.opened``)
        self._max_batch = max_batch_size
        self._max_tokens = max_batch_tokens
        # a batch holding a chunk holds at most this many tokens
        self._chunk_cap = min(chunk_tokens, max_batch_tokens or chunk_tokens) if chunk_tokens is not None else None
        self._max_wait = max_wait_s
        self._max_batch_wait = max(max_wait_s, max_batch_wait_s if max_batch_wait_s is not None else max_wait_s)
        quantum = quantum_tokens if quantum_tokens is not None else chunk_tokens or 1024
        self._queue: FairQueue[_Job] = FairQueue(quantum, max_queue)
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
            if self._chunked(key, job.tokens):
                job.chunk = Chunk(job.ids, 0, self._chunk)
            if not self._queue.push(key, job, job.cost, job.later):
                raise ScorerUnavailable("queue_full", "scorer queue is full")
            self._lock.notify()
        try:
            early_row, row = await asyncio.wait_for(asyncio.wrap_future(job.future), timeout_s)
        except TimeoutError as e:
            self._abandon(job)
            raise ScorerUnavailable("timeout", f"scorer took longer than {timeout_s:.1f}s") from e
        except asyncio.CancelledError:
            self._abandon(job)
            raise
        started = job.started if job.started is not None else time.perf_counter()
        return BatchResult(row, queue_s=started - job.enqueued, early=early_row)

    def _chunked(self, key: str, tokens: int) -> bool:
        """Whether a prompt of ``key`` with ``tokens`` is scored in chunks: where it is longer than
        ``chunk_above_tokens``, or than ``chunk_tokens`` while its key floods the scorer (a full pass's tokens,
        ``max_batch_tokens``, already waiting) and another key has asked within ``CONTENDED_S``: a key that floods
        with prompts just short of ``chunk_above_tokens`` then pays for its chunks, not the others for its passes;
        alone, a busy key's prompts batch whole. Under the lock."""
        now = time.monotonic()
        contended = any(k != key and now - t < CONTENDED_S for k, t in self._seen.items())
        self._seen[key] = now
        if len(self._seen) > 256:  # only recent keys matter
            self._seen = {k: t for k, t in self._seen.items() if now - t < CONTENDED_S}
        if self._chunk is None or tokens <= self._chunk:
            return False
        return tokens > self._chunk_above or (contended and self._queue.backlog(key) >= self._flood_tokens)

    def _abandon(self, job: _Job) -> None:
        """A request that gave up: out of the queue, its state dropped, where it waits; where its pass is under
        way, the worker drops it after that pass (its future cancelled: a chunked prompt's stays pending until
        its last chunk starts)."""
        job.future.cancel()
        with self._lock:
            if self._queue.remove(job.key, job):
                self._close(job)

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
                self._close(job)
        for job in queued:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(ScorerUnavailable("stopped", "scorer is stopped"))

    def _collect(self) -> list[_Job] | None:
        """The next batch (None once stopped): its first request in round-robin order, then more as they come."""
        with self._lock:
            while True:
                if self._stopped:
                    return None
                first = self._queue.pop(waits=self._waits)
                if first is not None:
                    self._opens(first)
                    break
                self._lock.wait()
            batch, tokens, chunked = [first], first.cost, first.chunk is not None
            joined = time.perf_counter()
            cap = joined + self._max_batch_wait
            while len(batch) < self._max_batch and not self._stopped:
                limit = self._chunk_cap if chunked else self._max_tokens
                room = None if limit is None else limit - tokens
                job = self._queue.pop(room, self._fits_beside(tokens), self._waits)
                if job is not None:
                    self._opens(job)
                    batch.append(job)
                    tokens += job.cost
                    chunked = chunked or job.chunk is not None
                    joined = time.perf_counter()
                    continue
                if len(self._queue):  # the next prompt would take the batch over max_batch_tokens: it is full
                    break
                remaining = min(joined + self._max_wait, cap) - time.perf_counter()
                if remaining <= 0:
                    break
                self._lock.wait(remaining)
            return batch

    def _waits(self, job: _Job) -> bool:
        """A long prompt not begun waits while ``max_open_chunked`` others are partway through."""
        return job.chunk is not None and not job.opened and self._open >= self._max_open

    def _opens(self, job: _Job) -> None:
        """A job taken for a pass: a long prompt's first chunk opens it. Under the lock."""
        if job.chunk is not None and not job.opened:
            job.opened = True
            self._open += 1

    def _close(self, job: _Job) -> None:
        """A job whose prompt's chunks end (all run, or it gave up): its state dropped, its place among the open
        prompts freed for one that waits. Under the lock."""
        job.chunk = None
        if job.opened:
            job.opened = False
            self._open -= 1
            self._lock.notify_all()

    def _fits_beside(self, tokens: int) -> Callable[[_Job], bool] | None:
        """Whether a job may join a batch of ``tokens`` tokens: a chunk only where the batch stays within
        ``chunk_tokens`` (whole prompts: ``max_batch_tokens``, ``_collect``'s room)."""
        cap = self._chunk_cap
        if cap is None:
            return None
        return lambda job: job.chunk is None or tokens + job.cost <= cap

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
        pieces = [job.piece() for job in batch]
        if self._staged is not None and any(job.early is not None or job.chunk is not None for job in batch):
            return self._staged(pieces, [job.early if job.chunk is None else None for job in batch])
        return [(None, row) for row in self._features(pieces)]  # type: ignore[arg-type]

    def _starts(self, job: _Job) -> bool:
        """Whether a job taken for a pass runs: not where its request gave up (a chunk not its prompt's last keeps
        its future pending, so that it can still be cancelled; the state of one that was is dropped)."""
        if job.partial and not job.future.cancelled():
            return True
        if not job.partial and job.future.set_running_or_notify_cancel():
            return True
        with self._lock:
            self._drop(job)
        return False

    def _drop(self, job: _Job) -> None:
        """A job taken out of the queue that will not come back: its later tokens out of its key's backlog, its
        state freed. Under the lock."""
        if job.later:
            self._queue.release(job.key, job.later)
        self._close(job)

    def _fail(self, job: _Job, error: ScorerUnavailable) -> None:
        partial = job.partial
        with self._lock:
            self._drop(job)
        if partial and not job.future.set_running_or_notify_cancel():  # gave up meanwhile
            return
        job.future.set_exception(error)

    def _next_chunks(self, jobs: list[_Job]) -> None:
        """Jobs whose chunk has run go back to the front of their key's queue with their next chunk; where their
        request gave up, or the batcher stopped, their state is dropped instead."""
        stopped = []
        with self._lock:
            for job in jobs:
                if self._stopped or job.future.cancelled():
                    self._drop(job)
                    stopped.append(job)
                    continue
                done = job.chunk
                assert done is not None and self._chunk is not None
                job.chunk = Chunk(job.ids, done.end, min(done.end + self._chunk, job.tokens), done.state)
                self._queue.requeue(job.key, job, job.cost, job.later)
            if len(stopped) < len(jobs):
                self._lock.notify()
        for job in stopped:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(ScorerUnavailable("stopped", "scorer is stopped"))

    def _run(self) -> None:
        if self._worker_setup is not None:
            self._worker_setup()
        if self._warmup is not None:
            self._warm_up(self._warmup)
        while (batch := self._collect()) is not None:
            batch = [job for job in batch if self._starts(job)]
            if not batch:
                continue
            tokens = sum(job.cost for job in batch)
            started = time.perf_counter()
            with self._lock:
                self._running[threading.get_ident()] = (started, tokens)
            for job in batch:
                if job.started is None:
                    job.started = started
            try:
                results = self._pass(batch)
            except Exception as e:  # one bad batch must not kill the worker
                log.exception("scorer forward pass failed")
                for job in batch:
                    self._fail(job, ScorerUnavailable("failed", f"scorer failed: {e}"))
                continue
            finally:
                with self._lock:
                    del self._running[threading.get_ident()]
            elapsed = time.perf_counter() - started
            per_token = elapsed / max(1, tokens)
            weight = 1 - math.exp(-tokens / AVERAGE_TOKENS)
            self._token_s = per_token if self._token_s is None else (1 - weight) * self._token_s + weight * per_token
            if self._on_batch is not None:
                stopped = sum(1 for job, (_, row) in zip(batch, results, strict=True) if job.early and row is None
                              and job.chunk is None)
                chunks = sum(1 for job in batch if job.chunk is not None)
                self._on_batch(BatchStats(len(batch), elapsed, tokens=tokens, stopped=stopped, chunks=chunks))
            finished = [(job, result) for job, result in zip(batch, results, strict=True) if not job.partial]
            if len(finished) < len(batch):  # before any job goes back to the queue (another worker may take it)
                self._next_chunks([job for job in batch if job.partial])
            if any(job.chunk is not None for job, _ in finished):
                with self._lock:
                    for job, _ in finished:
                        self._close(job)  # its prompt's last chunk ran: its state goes
            for job, result in finished:
                job.future.set_result(result)
