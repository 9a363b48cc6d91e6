"""Scorer features for a dataset, computed with the gateway's own feature function and cached on disk.

The cache key is the scorer's fingerprint (weights, layers, pooling, chat template, recipe version) and the
dataset's questions, so a change to any of them computes afresh.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from probes.data import Dataset
from probes.fit import Inputs
from router.config import ScorerConfig
from router.scorer.features import FeatureExtractor
from router.text_features import prompt_text

log = logging.getLogger(__name__)


def cache_path(cache_dir: Path, fingerprint: str, dataset: Dataset, max_prompt_tokens: int) -> Path:
    return Path(cache_dir) / "features" / fingerprint / f"{dataset.digest()}-t{max_prompt_tokens}.npy"


def extract_features(
    cfg: ScorerConfig, dataset: Dataset, *, batch_size: int = 16, extractor: FeatureExtractor | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, FeatureExtractor]:
    """Features of every question of ``dataset`` (one row each) and the extractor that made them."""
    extractor = extractor or FeatureExtractor(cfg)
    path = cache_path(cfg.cache_dir, extractor.info.fingerprint, dataset, cfg.max_prompt_tokens)
    if path.is_file():
        log.info("features from cache %s", path)
        return np.load(path), extractor
    conversations = dataset.conversations()
    # Batches of similar lengths: padding is computed and thrown away, and with prompts of very different
    # lengths it would be most of the work. Right padding leaves every row's real tokens as they are alone.
    prompts = [extractor.render(c) for c in conversations]
    order = np.argsort([len(p) for p in prompts], kind="stable")
    features = np.zeros((len(prompts), extractor.info.feature_dim), dtype=np.float32)
    bar = tqdm(total=len(prompts), desc="scorer features", unit="q", disable=not progress)
    for start in range(0, len(prompts), batch_size):
        idx = order[start:start + batch_size]
        features[idx] = extractor.features_from_prompts([prompts[i] for i in idx])
        bar.update(len(idx))
    bar.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, features)
    tmp.rename(path)
    return features, extractor


def probe_inputs(
    cfg: ScorerConfig, dataset: Dataset, text: str, *, extractor: FeatureExtractor | None = None,
    progress: bool = True,
) -> tuple[Any, FeatureExtractor]:
    """What a probe reads for each question: the scorer's features, with the prompt texts beside them when the
    probe also reads text features (``text`` ≠ "none")."""
    features, extractor = extract_features(cfg, dataset, extractor=extractor, progress=progress)
    if text == "none":
        return features, extractor
    return Inputs(features, tuple(prompt_text(c) for c in dataset.conversations())), extractor
