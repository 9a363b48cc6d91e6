"""The scorer: a small model's forward pass over a prompt, read as the feature vector the probes use.

The public face of ``router.scorer`` for ``probes/``, ``loadtest/`` and research code. Names that need torch
(the in-process model) are imported only when first used, so a gateway whose scorer is a vLLM server, and
``import router.scorer`` itself, never load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from router.config import ScorerConfig
from router.scorer.interface import BatchStats, EarlyExit, Scored, Scorer, ScorerUnavailable
from router.scorer.recipe import FEATURE_VERSION, Message, ScorerInfo, describe, message_text, normalise_messages

if TYPE_CHECKING:
    from router.scorer.cpu import compute_dtype, configure_openmp, cpu_flags, native_cpu_dtype
    from router.scorer.features import FeatureExtractor
    from router.scorer.local import LocalScorer
    from router.scorer.packed import PackedDecoder, PrepackedLinear
    from router.scorer.prompt import CONVERSATION_VIEWS, PromptEncoder
    from router.scorer.source import ModelFolder, resolve_model, truncate_model
    from router.scorer.vllm import VllmScorer, vllm_pooling_args

__all__ = [
    "CONVERSATION_VIEWS",
    "FEATURE_VERSION",
    "BatchStats",
    "EarlyExit",
    "FeatureExtractor",
    "LocalScorer",
    "Message",
    "ModelFolder",
    "PackedDecoder",
    "PrepackedLinear",
    "PromptEncoder",
    "Scored",
    "Scorer",
    "ScorerInfo",
    "ScorerUnavailable",
    "VllmScorer",
    "compute_dtype",
    "configure_openmp",
    "cpu_flags",
    "describe",
    "message_text",
    "native_cpu_dtype",
    "normalise_messages",
    "open_scorer",
    "resolve_model",
    "truncate_model",
    "vllm_pooling_args",
]

_LAZY = {
    "FeatureExtractor": "features", "LocalScorer": "local", "PackedDecoder": "packed", "PrepackedLinear": "packed",
    "CONVERSATION_VIEWS": "prompt", "PromptEncoder": "prompt",
    "ModelFolder": "source", "resolve_model": "source", "truncate_model": "source",
    "VllmScorer": "vllm", "vllm_pooling_args": "vllm", "compute_dtype": "cpu", "configure_openmp": "cpu",
    "cpu_flags": "cpu", "native_cpu_dtype": "cpu",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'router.scorer' has no attribute {name!r}")
    return getattr(importlib.import_module(f"router.scorer.{module}"), name)


SCORERS = {"local": ("router.scorer.local", "LocalScorer", "load"), "vllm": ("router.scorer.vllm", "VllmScorer", "")}
"""``scorer.kind`` → (module, class, constructor): each kind is loaded only when a config names it."""


def open_scorer(cfg: ScorerConfig) -> Scorer:
    """The scorer ``cfg`` describes, loaded (a local model is loaded now; a remote one is contacted in start)."""
    module, name, constructor = SCORERS[cfg.kind]
    cls = getattr(importlib.import_module(module), name)
    return getattr(cls, constructor)(cfg) if constructor else cls(cfg)
