"""The ``local`` scorer: the feature function in this process, micro-batched on ``scorer.workers`` worker threads."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from router.config import ScorerConfig
from router.scorer.batcher import MicroBatcher
from router.scorer.cpu import call_in_own_thread
from router.scorer.features import FeatureExtractor
from router.scorer.interface import BatchStats, Scored, ScorerUnavailable
from router.scorer.recipe import Message, ScorerInfo

# A question of typical length (the median GSM8K test question has 55 words) for the warm-up pass, which also
# seeds the batcher's estimate of the time per prompt.
WARMUP_QUESTION = ("A bakery sells 48 muffins in the morning and a third as many in the afternoon. Each muffin "
                   "costs $2.50, and the bakery spends $30 a day on flour, sugar and butter. On Sundays it sells "
                   "twice as many muffins as on other days. How much profit does the bakery make from its muffins "
                   "on a Sunday?")


class LocalScorer:
    """A loaded ``FeatureExtractor`` (shareable between apps) and, between start and aclose, its batcher."""

    def __init__(self, extractor: FeatureExtractor, cfg: ScorerConfig) -> None:
        self.extractor = extractor
        self.cfg = cfg
        self.info: ScorerInfo = extractor.info
        self.encoder = extractor.encoder
        self._batcher: MicroBatcher | None = None

    @classmethod
    def load(cls, cfg: ScorerConfig) -> LocalScorer:
        """Loads the model off the calling thread: the batcher's workers must be OpenMP's only masters
        (``router.scorer.cpu``)."""
        return cls(call_in_own_thread(lambda: FeatureExtractor(cfg)), cfg)

    async def start(self, on_batch: Callable[[BatchStats], None] | None = None) -> None:
        threads = self.threads_per_worker()
        self._batcher = MicroBatcher(
            self.extractor.features_from_ids,
            max_batch_size=self.cfg.max_batch_size,
            max_wait_s=self.cfg.max_wait_ms / 1000,
            max_batch_wait_s=self.cfg.max_batch_wait_ms / 1000,
            max_queue=self.cfg.max_queue,
            on_batch=on_batch,
            warmup=self.encoder.encode([{"role": "user", "content": WARMUP_QUESTION}]),
            workers=self.cfg.workers,
            worker_setup=lambda: torch.set_num_threads(threads),
        )

    def threads_per_worker(self) -> int:
        """``scorer.threads``, or torch's thread count (one per core unless set) shared among the workers."""
        return self.cfg.threads or max(1, torch.get_num_threads() // self.cfg.workers)

    async def score(self, messages: Sequence[Message], timeout_s: float | None = None) -> Scored:
        if self._batcher is None:
            raise ScorerUnavailable("stopped", "scorer is not started")
        start = time.perf_counter()
        ids = self.encoder.encode(messages)
        result = await self._batcher.run(ids, timeout_s=timeout_s)
        return Scored(result.row, prompt_tokens=len(ids), queue_s=result.queue_s,
                      total_s=time.perf_counter() - start)

    @property
    def alive(self) -> bool:
        return self._batcher is not None and self._batcher.alive

    async def check(self) -> bool:
        return self.alive

    async def aclose(self) -> None:
        if self._batcher is not None:
            self._batcher.close()
