"""Scorer features for a dataset, computed through the gateway's own scorer interface and cached on disk.

The same ``Scorer`` the gateway routes with (``scorer.kind`` local or vllm) scores every question, so a probe is
trained on exactly the features it will see. The cache key is the scorer's fingerprint (weights, recipe, chat
template) and the dataset's questions, so a change to any of them computes afresh; the local and vLLM scorers
of one recipe share a fingerprint, and so a cache. The dtype the pass runs in (``scorer.dtype``, 'auto' resolved
for this machine) is in the file name: probes hold across dtypes, but a cache holds what this machine computes.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from probes.data import Dataset
from probes.fit import Inputs
from router import ScorerConfig, prompt_text
from router.scorer import Scorer, compute_dtype, open_scorer

log = logging.getLogger(__name__)


def cache_path(cfg: ScorerConfig, fingerprint: str, dataset: Dataset) -> Path:
    name = f"{dataset.digest()}-t{cfg.max_prompt_tokens}-{compute_dtype(cfg)}.npy"
    return Path(cfg.cache_dir) / "features" / fingerprint / name


async def _score_all(scorer: Scorer, conversations: list, concurrency: int, progress: bool) -> np.ndarray:
    """Every conversation's features, ``concurrency`` at a time, shortest first: the scorer batches what arrives
    together, so prompts of similar length share a batch and little padding is computed and thrown away."""
    await scorer.start()
    rows: list[np.ndarray | None] = [None] * len(conversations)
    slots = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(conversations), desc="scorer features", unit="q", disable=not progress)
    order = np.argsort([len(str(c)) for c in conversations], kind="stable")

    async def one(i: int) -> None:
        async with slots:
            rows[i] = (await scorer.score(conversations[i])).features
        bar.update(1)

    try:
        await asyncio.gather(*(one(int(i)) for i in order))
    finally:
        bar.close()
        await scorer.aclose()
    return np.stack(rows) if rows else np.zeros((0, scorer.info.feature_dim), dtype=np.float32)


def extract_features(
    cfg: ScorerConfig, dataset: Dataset, *, scorer: Scorer | None = None, progress: bool = True,
) -> tuple[np.ndarray, Scorer]:
    """Features of every question of ``dataset`` (one row each) and the scorer that made them. A subset
    (``Dataset.subset``) reads its rows of the whole file's features."""
    if dataset.parent is not None:
        features, scorer = extract_features(cfg, dataset.parent, scorer=scorer, progress=progress)
        return features[np.array(dataset.rows, dtype=np.int64)], scorer
    scorer = scorer or open_scorer(cfg)
    path = cache_path(cfg, scorer.info.fingerprint, dataset)
    if path.is_file():
        log.info("features from cache %s", path)
        return np.load(path), scorer
    concurrency = cfg.max_in_flight if cfg.kind == "vllm" else 2 * cfg.max_batch_size
    features = asyncio.run(_score_all(scorer, dataset.conversations(), concurrency, progress))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, features)
    tmp.rename(path)
    return features, scorer


def probe_inputs(
    cfg: ScorerConfig, dataset: Dataset, text: str, *, scorer: Scorer | None = None, progress: bool = True,
) -> tuple[Any, Scorer]:
    """What a probe reads for each question: the scorer's features, with the prompt texts beside them when the
    probe also reads text features (``text`` ≠ "none")."""
    features, scorer = extract_features(cfg, dataset, scorer=scorer, progress=progress)
    if text == "none":
        return features, scorer
    return Inputs(features, tuple(prompt_text(c) for c in dataset.conversations())), scorer
