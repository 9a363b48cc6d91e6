"""The packed forward pass (no padding, the shared prefix computed once) against transformers' padded pass."""

from __future__ import annotations

import numpy as np
import pytest

from router.config import ScorerConfig
from router.scorer.features import FeatureExtractor
from router.scorer.packed import PrepackedLinear

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "user", "content": "Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}],
    [{"role": "user", "content": "A"}],
    [{"role": "user", "content": "A robe takes 2 bolts of blue fiber and half that much white fiber. " * 3}],
]


@pytest.mark.parametrize(("layers", "pooling"), [([2], "last"), ([2], "mean"), ([1, 3], "last+mean"),
                                                 ([4], "last"), ([1, 4], "last")])
def test_packed_features_are_transformers_padded_features(tiny_scorer_cfg: ScorerConfig, layers: list[int],
                                                          pooling: str) -> None:
    extractor = FeatureExtractor(tiny_scorer_cfg.model_copy(update={"layers": layers, "pooling": pooling}))
    assert extractor.packed is not None and extractor.packed.prefix is not None
    ids = [extractor.encoder.encode(c) for c in CONVERSATIONS]
    prefix = extractor.packed.prefix.ids
    starts_with_prefix = [i[:len(prefix)] == prefix for i in ids]
    assert any(starts_with_prefix) and not all(starts_with_prefix)  # both kinds of prompt are in the batch
    packed = extractor.features_from_ids(ids)
    padded = extractor.padded_features(ids)
    assert packed.shape == padded.shape == (len(ids), extractor.info.feature_dim)
    np.testing.assert_allclose(packed, padded, rtol=1e-4, atol=1e-5)
    one_at_a_time = np.concatenate([extractor.features_from_ids([i]) for i in ids])
    np.testing.assert_allclose(one_at_a_time, padded, rtol=1e-4, atol=1e-5)


def test_float32_projections_run_on_weights_prepacked_once_and_bf16_ones_as_they_are(
        tiny_scorer_cfg: ScorerConfig) -> None:
    fp32 = FeatureExtractor(tiny_scorer_cfg)
    bf16 = FeatureExtractor(tiny_scorer_cfg.model_copy(update={"dtype": "bfloat16"}))
    assert fp32.packed is not None and bf16.packed is not None
    assert all(isinstance(p, PrepackedLinear) for p in [*fp32.packed.qkv, *fp32.packed.o, *fp32.packed.down])
    assert not any(isinstance(p, PrepackedLinear) for p in [*bf16.packed.qkv, *bf16.packed.gate_up])
    ids = [fp32.encoder.encode(c) for c in CONVERSATIONS]  # the test above: prepacked float32 = transformers
    np.testing.assert_allclose(bf16.features_from_ids(ids), fp32.features_from_ids(ids), rtol=0.1, atol=0.1)


def test_a_prompt_cut_from_the_left_runs_without_the_prefix(tiny_scorer_cfg: ScorerConfig) -> None:
    extractor = FeatureExtractor(tiny_scorer_cfg.model_copy(update={"max_prompt_tokens": 24}))
    long = [{"role": "user", "content": "Janet's ducks lay 16 eggs per day. " * 4}]
    ids = [extractor.encoder.encode(long), extractor.encoder.encode(CONVERSATIONS[0])]
    assert len(ids[0]) == 24
    assert extractor.packed is not None and extractor.packed.prefix is not None
    assert ids[0][:len(extractor.packed.prefix.ids)] != extractor.packed.prefix.ids
    np.testing.assert_allclose(extractor.features_from_ids(ids), extractor.padded_features(ids), rtol=1e-4,
                               atol=1e-5)


def test_the_shared_prefix_is_what_every_one_message_prompt_starts_with(tiny_extractor: FeatureExtractor) -> None:
    prefix = tiny_extractor.encoder.shared_prefix()
    assert prefix
    for conversation in (CONVERSATIONS[0], CONVERSATIONS[3]):
        assert tiny_extractor.encoder.encode(conversation)[:len(prefix)] == prefix


def test_packing_off_runs_the_padded_pass(tiny_scorer_cfg: ScorerConfig) -> None:
    extractor = FeatureExtractor(tiny_scorer_cfg.model_copy(update={"packing": False}))
    assert extractor.packed is None
    ids = [extractor.encoder.encode(c) for c in CONVERSATIONS]
    np.testing.assert_array_equal(extractor.features_from_ids(ids), extractor.padded_features(ids))
