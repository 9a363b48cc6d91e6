"""The one seam between routing and features: the ``Scorer`` protocol (``router.scorer.open_scorer`` makes one).

A scorer turns a request's messages into the feature vector its probes read, and says which recipe those
features follow (``info``: model, layers, pooling, final norm, fingerprint), so a probe trained through any
scorer with the same recipe loads on any other. Two implementations, chosen by ``scorer.kind``:

- ``local`` (``router.scorer.local``): the model in this process, micro-batched in a worker thread;
- ``vllm`` (``router.scorer.vllm``): a vLLM server running the model with the pooling runner, shared by
  gateways; this process then loads no model.

Both render and tokenise with ``router.scorer.prompt``, so only the forward pass differs.

Two optional keyword arguments of ``score`` serve the cheap stages of a decision (issue #36):

- ``key``: whose request it is (the API key's name). The local scorer shares its passes among keys by tokens
  (``router.scorer.batcher``), the vLLM scorer bounds each key's tokens in flight, so a key that floods the scorer
  with long prompts waits behind its own backlog, not other keys'.
- ``early``: an ``EarlyExit`` asks the pass to stop at a shallower block for a prompt the caller can already
  decide from that block's features. Only a scorer whose ``early_exit_info(layer)`` is not None honours it (the
  local scorer's packed pass); any other returns the full features and ``early=None``, as if it had not been asked.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

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
class EarlyExit:
    """Features at block ``layer`` as well as the configured ones, and the chance to stop the pass there.

    ``should_stop`` gets the prompt's features at ``layer`` (the configured pooling and final norm, float32, one
    vector: what a scorer configured with ``layers: [layer]`` returns) and says whether to stop: True, and the
    blocks after ``layer`` do not run for this prompt; False, and its pass goes on to the configured layers. It runs
    in the scorer's worker thread, inside the pass, so it must be quick, pure computation (an early probe and a
    clarity check) and must not block; one that raises counts as False (the prompt is scored in full)."""

    layer: int
    should_stop: Callable[[np.ndarray], bool]


@dataclass(frozen=True)
class Scored:
    features: np.ndarray | None  # the configured recipe's features; None only when an early exit stopped the pass
    prompt_tokens: int  # as the scorer's tokenizer counts them, after truncation
    queue_s: float  # waiting before the forward pass began
    total_s: float  # from the call to the result
    early: np.ndarray | None = None  # the features at ``EarlyExit.layer``, when one was asked for and honoured
    stopped: bool = False  # ``should_stop`` said stop: the pass ended at the early layer, ``features`` is None


@dataclass(eq=False)
class Chunk:
    """One part of a long prompt's forward pass (``scorer.chunk_tokens``): the prompt's tokens ``ids[start:end]``,
    run after ``ids[:start]``, whose keys and values the pass keeps in ``state`` between chunks (None before the
    first; what it holds is the pass's own business). Only the last chunk (``end == len(ids)``) gives features."""

    ids: Sequence[int]  # the whole prompt
    start: int
    end: int
    state: Any = None

    @property
    def last(self) -> bool:
        return self.end >= len(self.ids)


@dataclass(frozen=True)
class BatchStats:
    size: int
    forward_s: float
    tokens: int = 0  # the prompts' tokens
    stopped: int = 0  # prompts whose pass stopped at an early exit
    chunks: int = 0  # parts of long prompts (``Chunk``) among the batch's ``size``


class Scorer(Protocol):
    info: ScorerInfo
    encoder: PromptEncoder  # how it renders and tokenises (the same code for every kind)

    async def start(self, on_batch: Callable[[BatchStats], None] | None = None) -> None:
        """Get ready to score inside the running event loop (a local scorer starts its worker thread and calls
        ``on_batch`` after each forward pass)."""

    async def score(self, messages: Sequence[Message], timeout_s: float | None = None, *, key: str = "",
                    early: EarlyExit | None = None, ids: Sequence[int] | None = None) -> Scored:
        """Features of one conversation; raise ScorerUnavailable at once when it cannot be had in ``timeout_s``.

        ``key``: the sender (an API key's name; "" for anonymous), whose share of the scorer this request uses.
        ``early``: an early exit (honoured where ``early_exit_info(early.layer)`` is not None).
        ``ids``: ``encoder.encode(messages)``, when the caller already has it (e.g. to look up the score cache);
        the scorer then does not render and tokenise again."""

    def early_exit_info(self, layer: int) -> ScorerInfo | None:
        """The recipe of the features an ``EarlyExit`` at ``layer`` returns (check an early probe's fingerprint
        against it), or None where this scorer cannot stop early there (the vLLM scorer, the padded pass, a layer
        not before the deepest configured one)."""

    @property
    def alive(self) -> bool:
        """Whether a request sent now would be scored (false while a remote scorer is known to be down)."""

    async def check(self) -> bool:
        """Whether it can score now, checked actively (a remote scorer's /health, which feeds its circuit)."""

    async def aclose(self) -> None: ...
