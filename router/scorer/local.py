"""The ``local`` scorer: the feature function in this process, micro-batched on ``scorer.workers`` worker threads,
shared among keys by tokens (``router.scorer.batcher``), with early exits and long prompts scored in chunks
(``scorer.chunk_tokens``) where the pass is packed."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from router.config import ScorerConfig
from router.scorer.batcher import MicroBatcher
from router.scorer.cpu import call_in_own_thread
from router.scorer.features import FeatureExtractor
from router.scorer.interface import BatchStats, EarlyExit, Scored, ScorerUnavailable
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
        chunk = (self.cfg.chunk_tokens or None) if self.extractor.chunks else None
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
            max_batch_tokens=self.cfg.max_batch_tokens or self.cfg.max_prompt_tokens,
            quantum_tokens=chunk or self.cfg.max_prompt_tokens,
            staged=self.extractor.staged_features_from_ids if self.extractor.packed is not None else None,
            chunk_tokens=chunk,
            chunk_above_tokens=self.cfg.chunk_above_tokens,
            max_open_chunked=self.cfg.max_chunked_prompts,
        )

    def threads_per_worker(self) -> int:
        """``scorer.threads``, or torch's thread count (one per core unless set) shared among the workers."""
        return self.cfg.threads or max(1, torch.get_num_threads() // self.cfg.workers)

    async def score(self, messages: Sequence[Message], timeout_s: float | None = None, *, key: str = "",
                    early: EarlyExit | None = None, ids: Sequence[int] | None = None) -> Scored:
        if self._batcher is None:
            raise ScorerUnavailable("stopped", "scorer is not started")
        start = time.perf_counter()
        if ids is None:
            # a request refused for the key's backlog costs no tokenising: its tokens are at least ``min_tokens``
            self._batcher.admit(key, self.encoder.min_tokens(messages), timeout_s)
            ids = await self.encoder.encode_async(messages)
        if early is not None and self.early_exit_info(early.layer) is None:
            early = None  # not a layer this pass can stop at: scored in full, as the protocol says
        result = await self._batcher.run(ids, timeout_s=timeout_s, key=key, early=early)
        return Scored(result.row, prompt_tokens=len(ids), queue_s=result.queue_s,
                      total_s=time.perf_counter() - start, early=result.early,
                      stopped=early is not None and result.row is None)

    def early_exit_info(self, layer: int) -> ScorerInfo | None:
        return self.extractor.early_exit_info(layer)

    @property
    def alive(self) -> bool:
        return self._batcher is not None and self._batcher.alive

    async def check(self) -> bool:
        return self.alive

    async def aclose(self) -> None:
        if self._batcher is not None:
            self._batcher.close()
