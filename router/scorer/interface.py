"""The one seam between routing and features: the ``Scorer`` protocol (``router.scorer.open_scorer`` makes one).

A scorer turns a request's messages into the feature vector its probes read, and says which recipe those
features follow (``info``: model, layers, pooling, final norm, fingerprint), so a probe trained through any
scorer with the same recipe loads on any other. Two implementations, chosen by ``scorer.kind``:

- ``local`` (``router.scorer.local``): the model in this process, micro-batched in a worker thread;
- ``vllm`` (``router.scorer.vllm``): a vLLM server running the model with the pooling runner, shared by
  gateways; this process then loads no model.

Both render and tokenise with ``router.scorer.prompt``, so only the forward pass differs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from router.scorer.prompt import PromptEncoder
from router.scorer.recipe import Message, ScorerInfo


class ScorerUnavailable(Exception):
    """The scorer cannot score this request; ``kind`` says why: overloaded, queue_full, timeout, failed, down,
    stopped, key_share (the sending key's share of the scorer stayed in use for the whole timeout)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Scored:
    features: np.ndarray
    prompt_tokens: int  # as the scorer's tokenizer counts them, after truncation
    queue_s: float  # waiting before the forward pass began
    total_s: float  # from the call to the result


@dataclass(frozen=True)
class BatchStats:
    size: int
    forward_s: float


class Scorer(Protocol):
    info: ScorerInfo
    encoder: PromptEncoder  # how it renders and tokenises (the same code for every kind)

    async def start(self, on_batch: Callable[[BatchStats], None] | None = None) -> None:
        """Get ready to score inside the running event loop (a local scorer starts its worker thread and calls
        ``on_batch`` after each forward pass)."""

    async def score(self, messages: Sequence[Message], timeout_s: float | None = None) -> Scored:
        """Features of one conversation; raise ScorerUnavailable at once when it cannot be had in ``timeout_s``."""

    @property
    def alive(self) -> bool:
        """Whether a request sent now would be scored (false while a remote scorer is known to be down)."""

    async def check(self) -> bool:
        """Whether it can score now, checked actively (a remote scorer's /health, which feeds its circuit)."""

    async def aclose(self) -> None: ...
