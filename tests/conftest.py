from __future__ import annotations

from pathlib import Path

import pytest

from router.config import ScorerConfig
from router.scorer.features import FeatureExtractor
from tests.support.tiny_model import build_tiny_model

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_scorer_cfg(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> ScorerConfig:
    return ScorerConfig(model=str(tiny_model_dir), layers=[2], dtype="float32", max_batch_size=4, max_wait_ms=20,
                        max_prompt_tokens=64, cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def tiny_extractor(tiny_scorer_cfg: ScorerConfig) -> FeatureExtractor:
    return FeatureExtractor(tiny_scorer_cfg)
