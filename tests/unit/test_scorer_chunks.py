"""Long prompts scored in chunks by the local scorer's batcher (``scorer.chunk_tokens``): the order of a prompt's
chunks, their place in the round robin beside other keys' prompts, requests that give up or a batcher that stops
between chunks, and the local scorer's features with chunks against without. Feature functions held by hand (no
timed assertions)."""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
import weakref
from collections.abc import Sequence

import numpy as np
import pytest

from router.metrics import Metrics
from router.scorer.batcher import BatchResult, MicroBatcher
from router.scorer.features import FeatureExtractor
from router.scorer.interface import Chunk, EarlyExit, ScorerUnavailable
from router.scorer.local import LocalScorer

A, B, W = 1, 2, 3  # the first token id says whose prompt it is; the second, which of its prompts


class _State:
    """What a pass keeps between a prompt's chunks: here, how far it has run."""

    def __init__(self) -> None:
        self.done = 0


class ChunkedPasses:
    """A staged feature function that takes chunks as the packed pass does (in order, each once, the state handed
    on), records each batch, and holds every pass until the test lets it go (``hold``) or not (``free``)."""

    def __init__(self, hold: bool = True) -> None:
        self.go = threading.Semaphore(0)
        self.hold = hold
        self.entered = threading.Semaphore(0)
        self.batches: list[list[tuple[int, int, int, int]]] = []  # (key token, prompt, start, end) per piece
        self.states: list[weakref.ref[_State]] = []
        self.running: set[int] = set()  # ids of the prompts whose chunk runs now
        self.lock = threading.Lock()

    def __call__(self, batch: Sequence[Sequence[int] | Chunk], exits: Sequence[EarlyExit | None]
                 ) -> list[tuple[np.ndarray | None, np.ndarray | None]]:
        self.entered.release()
        if self.hold:
            assert self.go.acquire(timeout=10)
        out: list[tuple[np.ndarray | None, np.ndarray | None]] = []
        record = []
        for piece, exit in zip(batch, exits, strict=True):
            if not isinstance(piece, Chunk):
                record.append((int(piece[0]), int(piece[1]) if len(piece) > 1 else 0, 0, len(piece)))
                out.append((None, np.array([piece[0], len(piece)], dtype=np.float32)))
                continue
            assert exit is None  # a chunk takes no exit
            if piece.state is None:
                assert piece.start == 0
                piece.state = _State()
                self.states.append(weakref.ref(piece.state))
            assert piece.start == piece.state.done, "chunks out of order"
            with self.lock:
                assert id(piece.state) not in self.running, "two chunks of a prompt at once"
                self.running.add(id(piece.state))
            time.sleep(0.001)  # room for another worker to try the same prompt
            with self.lock:
                self.running.discard(id(piece.state))
            piece.state.done = piece.end
            record.append((int(piece.ids[0]), int(piece.ids[1]), piece.start, piece.end))
            out.append((None, np.array([piece.ids[0], len(piece.ids)], dtype=np.float32)) if piece.last
                       else (None, None))
        self.batches.append(record)
        return out

    def let_go(self, passes: int = 1) -> None:
        for _ in range(passes):
            self.go.release()

    async def wait_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.acquire, True, 10)


def _plain(batch: Sequence[Sequence[int]]) -> np.ndarray:
    raise AssertionError("not called")


def _batcher(passes: ChunkedPasses, chunk: int = 100, **kw: object) -> MicroBatcher:
    """A batcher over ``passes`` (whole prompts without exits too: the plain pass is the staged one's rows)."""
    def plain(batch: Sequence[Sequence[int]]) -> np.ndarray:
        return np.stack([row for _, row in passes(batch, [None] * len(batch))])  # type: ignore[misc]

    settings: dict = {"max_batch_size": 8, "max_wait_s": 0.0, "max_queue": 64, "max_batch_tokens": 1000,
                      "staged": passes, "chunk_tokens": chunk, **kw}
    return MicroBatcher(plain, **settings)


def _wait_stopped(batcher: MicroBatcher) -> None:
    with batcher._lock:
        while not batcher._stopped:
            batcher._lock.wait(1)


def prompt(key: int, which: int, tokens: int) -> list[int]:
    return [key, which] + [0] * (tokens - 2)


def whose(batches: list[list[tuple[int, int, int, int]]]) -> list[str]:
    """Each batch as a string: 'A0:0-100' for (a chunk of) A's prompt 0, 'B' for a prompt of B's, 'W' of W's."""
    return [" ".join(f"A{p}:{s}-{e}" if k == A else {B: "B", W: "W"}[k] for k, p, s, e in batch)
            for batch in batches]


async def _behind_a_held_pass(batcher: MicroBatcher, passes: ChunkedPasses, first: tuple[list[int], str],
                              *groups: list[tuple[list[int], str]]) -> list[BatchResult]:
    """``first`` (prompt, key) in a held pass, then each group's prompts queued behind it, a group after the one
    before; then every pass let go: the results, in that order."""
    tasks = [asyncio.create_task(batcher.run(first[0], key=first[1]))]
    await passes.wait_entered()
    for group in groups:
        tasks += [asyncio.create_task(batcher.run(ids, key=key, timeout_s=30)) for ids, key in group]
        await asyncio.sleep(0)
    passes.hold = False
    passes.let_go()
    return await asyncio.wait_for(asyncio.gather(*tasks), 20)


async def test_a_long_prompts_chunks_run_in_order_and_other_keys_passes_run_between_them() -> None:
    passes = ChunkedPasses()
    batcher = _batcher(passes, chunk=100)
    try:
        results = await _behind_a_held_pass(batcher, passes, (prompt(W, 0, 30), "w"), [(prompt(A, 0, 350), "a")],
                                            [(prompt(B, i, 60), "b") for i in range(4)])
    finally:
        batcher.close()
    # A's prompt in 100-token chunks, each a pass of its own (a pass with a chunk holds at most 100 tokens), and
    # B's questions between them: the pass B waits behind is one chunk, never A's whole prompt
    assert whose(passes.batches) == ["W", "A0:0-100", "B", "A0:100-200", "B B", "A0:200-300", "B", "A0:300-350"]
    assert results[1].row is not None and list(results[1].row) == [A, 350]  # the last chunk's features
    assert all(r.row is not None and r.row[0] == B for r in results[2:])
    assert batcher._queue.backlog("a") == 0 and len(batcher._queue) == 0
    assert batcher._open == 0
    gc.collect()
    assert all(ref() is None for ref in passes.states)  # the state went with the last chunk


async def test_prompts_up_to_chunk_above_tokens_run_whole_and_batch_as_without_chunks() -> None:
    passes = ChunkedPasses()
    batcher = _batcher(passes, chunk=100, chunk_above_tokens=300)
    try:
        # one key's prompts of 150 and 300 tokens: longer than a chunk, not than chunk_above_tokens
        alone = await _behind_a_held_pass(batcher, passes, (prompt(W, 0, 30), "w"),
                                          [(prompt(B, i, 150), "b") for i in range(4)] + [(prompt(B, 4, 300), "b")])
        assert whose(passes.batches) == ["W", "B B B B B"]  # whole, in one pass, as without chunks
        passes.batches.clear()
        passes.hold = True
        passes.entered = threading.Semaphore(0)  # the next wait_entered waits for the next held pass
        mixed = await _behind_a_held_pass(batcher, passes, (prompt(W, 1, 30), "w"),
                                          [(prompt(B, i, 150), "b") for i in range(4)], [(prompt(A, 0, 301), "a")])
    finally:
        batcher.close()
    assert [int(r.row[1]) for r in alone[1:]] == [150, 150, 150, 150, 300]  # type: ignore[index]
    # A's 301-token prompt in chunks of 100, B's whole 150-token questions between them by tokens: a key's turn is
    # worth one chunk (100 tokens), so B takes a question every 1.5 turns and never shares a pass with a chunk
    assert whose(passes.batches) == ["W", "A0:0-100", "B", "A0:100-200", "B", "A0:200-300", "A0:300-301", "B B"]
    assert [int(r.row[1]) for r in mixed[1:]] == [150, 150, 150, 150, 301]  # type: ignore[index]
    assert batcher._open == 0 and len(batcher._queue) == 0


async def test_a_key_flooding_with_shorter_prompts_has_them_chunked_while_another_key_asks() -> None:
    # alone, a busy key's prompts under chunk_above_tokens run whole however many it has waiting
    passes = ChunkedPasses()
    batcher = _batcher(passes, chunk=100, chunk_above_tokens=500)  # max_batch_tokens 1000: a full pass
    try:
        await _behind_a_held_pass(batcher, passes, (prompt(A, 9, 30), "a"),
                                  [(prompt(A, i, 300), "a") for i in range(5)])
    finally:
        batcher.close()
    assert all(s == 0 and e == 300 for batch in passes.batches[1:] for _, _, s, e in batch)
    # with another key asking meanwhile, the prompt that arrives when its key already has a full pass's tokens
    # waiting (900 + 300 queued) is scored in chunks; B's question goes between them
    passes = ChunkedPasses()
    batcher = _batcher(passes, chunk=100, chunk_above_tokens=500)
    try:
        await _behind_a_held_pass(batcher, passes, (prompt(W, 0, 30), "w"),
                                  [(prompt(A, i, 300), "a") for i in range(5)], [(prompt(B, 0, 50), "b")])
    finally:
        batcher.close()
    pieces = [(p, s, e) for batch in passes.batches for k, p, s, e in batch if k == A]
    assert pieces[:4] == [(i, 0, 300) for i in range(4)]
    assert pieces[4:] == [(4, 0, 100), (4, 100, 200), (4, 200, 300)]
    assert batcher._open == 0 and len(batcher._queue) == 0


async def test_a_keys_later_chunks_keep_their_place_and_keys_share_by_tokens() -> None:
    passes = ChunkedPasses()
    batcher = _batcher(passes, chunk=100)
    try:
        await _behind_a_held_pass(batcher, passes, (prompt(W, 0, 30), "w"),
                                  [(prompt(A, i, 300), "a") for i in range(3)],
                                  [(prompt(B, i, 50), "b") for i in range(12)])
    finally:
        batcher.close()
    batches = passes.batches[1:]
    a_chunks = [(p, s) for batch in batches for k, p, s, _ in batch if k == A]
    # A's prompts one after the other: a prompt's later chunks go before A's next prompt
    assert a_chunks == [(p, s) for p in range(3) for s in (0, 100, 200)]
    # while both keys have work, their turns alternate, each worth 100 tokens: A's chunk, then B's two questions
    served = [sum(e - s for _, _, s, e in batch) for batch in batches]
    kinds = ["A" if batch[0][0] == A else "B" for batch in batches]
    assert kinds[:12] == ["A", "B"] * 6 and served[:12] == [100] * 12
    assert all(len(batch) == 1 or all(k == B for k, *_ in batch) for batch in batches)  # a chunk's pass: alone


async def test_a_request_cancelled_during_its_chunk_drops_its_state_at_the_next_boundary() -> None:
    passes = ChunkedPasses()
    batcher = _batcher(passes, chunk=100)
    try:
        long = asyncio.create_task(batcher.run(prompt(A, 0, 300), key="a", timeout_s=30))
        await passes.wait_entered()  # its first chunk's pass is under way
        batcher._token_s = 0.001  # as if timed: a token takes 1 ms
        # the estimate counts the 200 tokens A's prompt has left besides the chunk under way (at most 100 left)
        assert 0.21 - 1e-6 <= batcher.expected_wait_s("a", 10) <= 0.31 + 1e-6
        assert batcher._queue.backlog("a") == 200
        long.cancel()
        with pytest.raises(asyncio.CancelledError):
            await long
        passes.hold = False
        passes.let_go()
        after = await asyncio.wait_for(batcher.run(prompt(B, 0, 20), key="b"), 20)  # the worker has moved on
    finally:
        batcher.close()
    assert after.row is not None
    assert whose(passes.batches) == ["A0:0-100", "B"]  # its later chunks never ran
    assert batcher._queue.backlog("a") == 0 and batcher._open == 0
    gc.collect()
    assert passes.states and all(ref() is None for ref in passes.states)


async def test_a_request_that_times_out_between_chunks_leaves_the_queue_with_its_state() -> None:
    passes = ChunkedPasses()
    batcher = _batcher(passes, chunk=100)
    try:
        long = asyncio.create_task(batcher.run(prompt(A, 0, 300), key="a", timeout_s=0.5))
        await passes.wait_entered()  # A's first chunk
        held = asyncio.create_task(batcher.run(prompt(B, 0, 20), key="b", timeout_s=30))
        await asyncio.sleep(0)
        passes.let_go()  # A's first chunk ends; B's question runs next (B's turn), held until A has given up
        await passes.wait_entered()
        with pytest.raises(ScorerUnavailable, match="longer than") as gave_up:
            await long
        assert gave_up.value.kind == "timeout"
        assert batcher._queue.backlog("a") == 0 and batcher._queue.queued("a") == 0  # out at once
        assert batcher._open == 0
        gc.collect()
        assert all(ref() is None for ref in passes.states)
        passes.hold = False
        passes.let_go()
        await asyncio.wait_for(held, 20)
        await asyncio.wait_for(batcher.run(prompt(B, 1, 20), key="b"), 20)
    finally:
        passes.hold = False
        passes.let_go()
        batcher.close()
    assert whose(passes.batches) == ["A0:0-100", "B", "B"]


async def test_close_answers_prompts_between_chunks_and_queued_ones_and_drops_their_state() -> None:
    passes = ChunkedPasses()
    batcher = _batcher(passes, chunk=100)
    running = asyncio.create_task(batcher.run(prompt(A, 0, 300), key="a", timeout_s=30))
    await passes.wait_entered()
    queued = asyncio.create_task(batcher.run(prompt(B, 0, 300), key="b", timeout_s=30))
    await asyncio.sleep(0)
    closing = asyncio.create_task(asyncio.to_thread(batcher.close))
    await asyncio.to_thread(_wait_stopped, batcher)
    passes.let_go()  # A's chunk ends while the batcher stops: A is answered instead of queued again
    await asyncio.wait_for(closing, 20)
    for task in (running, queued):
        with pytest.raises(ScorerUnavailable, match="stopped"):
            await asyncio.wait_for(task, 20)
    assert whose(passes.batches) == ["A0:0-100"]
    assert batcher._open == 0
    gc.collect()
    assert passes.states and all(ref() is None for ref in passes.states)


async def test_with_two_workers_a_prompts_chunks_still_run_in_order_one_at_a_time() -> None:
    passes = ChunkedPasses(hold=False)
    batcher = _batcher(passes, chunk=40, workers=2, max_batch_size=3)
    try:
        jobs = [batcher.run(prompt(key, i, size), key=str(key), timeout_s=30)
                for i in range(6) for key, size in ((A, 230), (B, 35 + 30 * i))]
        results = await asyncio.wait_for(asyncio.gather(*jobs), 30)
    finally:
        batcher.close()
    assert [list(r.row) for r in results if r.row is not None] == [  # type: ignore[arg-type]
        [key, size] for i in range(6) for key, size in ((A, 230), (B, 35 + 30 * i))]
    for key, sizes in ((A, [230] * 6), (B, [35 + 30 * i for i in range(6)])):
        for p, size in enumerate(sizes):  # every chunk of every prompt, in order, once, whatever worker took it
            ran = [(s, e) for batch in passes.batches for k, q, s, e in batch if k == key and q == p]
            assert ran == [(s, min(s + 40, size)) for s in range(0, size, 40)]
    assert batcher._queue.backlog("1") == batcher._queue.backlog("2") == 0


async def test_a_chunk_pass_that_fails_answers_its_request_and_drops_its_state(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # the failure's log record would hold the failing pass's frames (pytest keeps records), and the state with them
    monkeypatch.setattr(logging.getLogger("router.scorer.batcher"), "disabled", True)
    passes = ChunkedPasses(hold=False)

    def failing(batch: Sequence[Sequence[int] | Chunk], exits: Sequence[EarlyExit | None]):  # type: ignore[no-untyped-def]
        if any(isinstance(piece, Chunk) and piece.start == 100 for piece in batch):
            raise RuntimeError("out of memory")
        return passes(batch, exits)

    batcher = _batcher(passes, chunk=100)
    batcher._staged = failing
    try:
        with pytest.raises(ScorerUnavailable, match="out of memory") as failed:
            await asyncio.wait_for(batcher.run(prompt(A, 0, 300), key="a"), 20)
        assert failed.value.kind == "failed"
        after = await asyncio.wait_for(batcher.run(prompt(A, 1, 20), key="a"), 20)  # the worker goes on
    finally:
        batcher.close()
    assert after.row is not None and whose(passes.batches) == ["A0:0-100", "A1:0-20"]
    assert batcher._queue.backlog("a") == 0 and batcher._open == 0
    gc.collect()
    assert all(ref() is None for ref in passes.states)


async def test_at_most_max_open_chunked_long_prompts_are_partway_at_once_and_others_run_meanwhile() -> None:
    passes = ChunkedPasses()
    batcher = _batcher(passes, chunk=100, max_open_chunked=1)
    try:
        results = await _behind_a_held_pass(batcher, passes, (prompt(B, 9, 30), "b"),
                                            [(prompt(key, 0, 300), str(key)) for key in (A, W)],
                                            [(prompt(B, i, 60), "b") for i in range(4)])
    finally:
        batcher.close()
    assert [list(r.row) for r in results[1:3] if r.row is not None] == [[A, 300], [W, 300]]
    pieces = [piece for batch in passes.batches[1:] for piece in batch]
    chunks = [(k, s) for k, _, s, _ in pieces if k in (A, W)]
    # W's prompt waits, its turns passed on to B, until A's last chunk has run: one prompt's state at a time
    assert chunks == [(A, 0), (A, 100), (A, 200), (W, 0), (W, 100), (W, 200)]
    # meanwhile B's questions ran between A's chunks, as without the bound: W's turns went to the next key
    assert [k for k, *_ in pieces[:pieces.index((W, 0, 0, 100))]] == [A, B, A, B, B, A]
    assert batcher._open == 0 and batcher._queue.backlog(str(A)) == batcher._queue.backlog(str(W)) == 0
    gc.collect()
    assert len(passes.states) == 2 and all(ref() is None for ref in passes.states)


async def test_a_long_prompt_waiting_for_an_open_place_can_give_up() -> None:
    passes = ChunkedPasses()
    batcher = _batcher(passes, chunk=100, max_open_chunked=1)
    try:
        long = asyncio.create_task(batcher.run(prompt(A, 0, 300), key="a", timeout_s=30))
        await passes.wait_entered()  # A's first chunk: the one open place taken
        waiting = asyncio.create_task(batcher.run(prompt(W, 0, 300), key="w", timeout_s=0.3))
        with pytest.raises(ScorerUnavailable, match="longer than"):
            await waiting
        assert batcher._queue.backlog("w") == 0 and batcher._open == 1
        passes.hold = False
        passes.let_go()
        assert (await asyncio.wait_for(long, 20)).row is not None
    finally:
        batcher.close()
    assert batcher._open == 0 and all(k == A for batch in passes.batches for k, *_ in batch)


def test_chunks_need_the_staged_pass() -> None:
    with pytest.raises(ValueError, match="chunk_tokens"):
        MicroBatcher(_plain, max_batch_size=1, max_wait_s=0.0, max_queue=1, chunk_tokens=10)
    with pytest.raises(ValueError, match="max_open_chunked"):
        MicroBatcher(_plain, max_batch_size=1, max_wait_s=0.0, max_queue=1, max_open_chunked=0)


# The local scorer with the tiny model: chunked and whole, the same features


async def test_local_scorer_scores_long_prompts_in_chunks_with_the_features_of_one_pass(
        tiny_extractor: FeatureExtractor) -> None:
    cfg = tiny_extractor.cfg.model_copy(update={"chunk_tokens": 30, "chunk_above_tokens": 30})
    scorer = LocalScorer(tiny_extractor, cfg)
    long = [{"role": "user", "content": "Janet's ducks lay 16 eggs per day. She eats three for breakfast. " * 3}]
    short = [{"role": "user", "content": "What is 2 + 2?"}]
    chunks: list[int] = []
    await scorer.start(on_batch=lambda stats: chunks.append(stats.chunks))
    try:
        assert scorer._batcher is not None and scorer._batcher._chunk == 30
        scored = await asyncio.gather(scorer.score(long, key="a"), scorer.score(short, key="b"),
                                      scorer.score(long, key="c", early=EarlyExit(1, lambda f: True)))
        # a short prompt's early exit is still honoured, alone and beside a long prompt's last chunk
        exits = await asyncio.gather(scorer.score(short, key="d", early=EarlyExit(1, lambda f: True)),
                                     scorer.score(long, key="e"),
                                     scorer.score(short, key="f", early=EarlyExit(1, lambda f: True)))
    finally:
        await scorer.aclose()
    for stopped in (exits[0], exits[2]):
        assert stopped.stopped and stopped.features is None and stopped.early is not None
    assert exits[1].features is not None
    ids = [tiny_extractor.encoder.encode(m) for m in (long, short)]
    assert len(ids[0]) > 2 * 30 and len(ids[1]) <= 30
    whole = tiny_extractor.features_from_ids(ids)
    for s, expected in zip(scored, [whole[0], whole[1], whole[0]], strict=True):
        assert s.features is not None
        np.testing.assert_allclose(s.features, expected, rtol=1e-5, atol=1e-5)
    assert not scored[2].stopped and scored[2].early is None  # a chunked prompt takes no early exit
    assert sum(chunks) == 3 * -(-len(ids[0]) // 30)  # every long prompt, in chunks
    metrics = Metrics()
    counted = LocalScorer(tiny_extractor, cfg)
    await counted.start(on_batch=metrics.observe_batch)
    try:
        await counted.score(long, key="g")
    finally:
        await counted.aclose()
    assert metrics.registry.get_sample_value("router_scorer_chunks_total") == -(-len(ids[0]) // 30)
    off = LocalScorer(tiny_extractor, tiny_extractor.cfg.model_copy(update={"chunk_tokens": 0}))
    await off.start()
    try:
        assert off._batcher is not None and off._batcher._chunk is None
    finally:
        await off.aclose()
