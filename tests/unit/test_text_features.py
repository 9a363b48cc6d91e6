"""Text features in the gateway: the same numbers as scikit-learn's TfidfVectorizer, saved inside the probe,
checked by digest, and folded into the probe set beside the activations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.feature_extraction.text import TfidfVectorizer

from probes.fit import fit_text_features
from router.probe import Probe, ProbeError, ProbeSet, check_compatible, load_probe, save_probe, scorer_block
from router.scorer.recipe import ScorerInfo
from router.text_features import TextFeatures, prompt_text
from tests.support.probes import TEXTS

INFO = ScorerInfo(model="m", layers=(2,), pooling="last", final_norm=True, hidden_size=2, feature_dim=2,
                  fingerprint="abc")


def test_tfidf_matches_scikit_learn() -> None:
    text = fit_text_features(TEXTS, min_df=1, length=False)
    sk = TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True).fit(TEXTS)
    unseen = ["The train travels 60 miles per hour, step by step step.", "nothing known here"]
    assert np.allclose(text.dense(unseen), sk.transform(unseen).toarray())
    assert np.allclose(text.sparse(unseen).toarray(), text.dense(unseen))


def test_length_feature_and_prompt_text() -> None:
    text = fit_text_features(TEXTS, min_df=1, length=True)
    row = text.dense(["one two three"])[0]
    assert row[-1] == pytest.approx(np.log1p(3))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text",
                                                                                          "text": "2 + 2?"}]}]
    assert prompt_text(messages) == "Be brief.\n2 + 2?"


def _text_probe(text: TextFeatures, seed: int = 0) -> Probe:
    rng = np.random.default_rng(seed)
    d = 2 + text.dim
    return Probe(mean=np.concatenate([[0.5, -0.5], np.zeros(text.dim - 1), [2.0]]),
                 scale=np.concatenate([[2.0, 1.0], np.ones(text.dim - 1), [0.5]]),
                 weight=rng.normal(size=d), bias=0.1, platt_a=1.2, platt_b=-0.3, scorer=scorer_block(INFO),
                 text=text)


def test_text_probe_round_trip_and_probe_set(tmp_path: Path) -> None:
    text = fit_text_features(TEXTS, min_df=1)
    probe = _text_probe(text)
    path = save_probe(probe, tmp_path / "p.json")
    doc = json.loads(path.read_text())
    assert doc["version"] == 2 and doc["text_features"]["digest"] == text.digest
    loaded = load_probe(path)
    check_compatible(loaded, INFO, "p")
    assert loaded.text is not None and loaded.text.digest == text.digest
    activations = np.array([0.3, -1.2])
    message = [{"role": "user", "content": "A train travels 60 miles per hour."}]
    dense = np.concatenate([activations, text.dense([prompt_text(message)])[0]])
    plain = Probe(np.array([0.0, 0.0]), np.array([1.0, 1.0]), np.array([0.4, 0.1]), 0.0)  # reads no text
    got = ProbeSet(["t", "plain"], [loaded, plain]).predict(activations, message)
    assert got["t"] == pytest.approx(float(probe.predict(dense[None])[0]), abs=1e-5)
    assert got["plain"] == pytest.approx(float(plain.predict(activations[None])[0]), abs=1e-6)


def test_tampered_vocabulary_or_other_text_features_are_refused(tmp_path: Path) -> None:
    text = fit_text_features(TEXTS, min_df=1)
    path = save_probe(_text_probe(text), tmp_path / "p.json")
    doc = json.loads(path.read_text())
    doc["text_features"]["vocabulary"][0] = "changed"
    path.write_text(json.dumps(doc))
    with pytest.raises(ProbeError, match="digest"):
        load_probe(path)
    other = fit_text_features(TEXTS[:3], min_df=1)
    with pytest.raises(ProbeError, match="different text features"):
        ProbeSet(["a", "b"], [_text_probe(text), _text_probe(other)])
    with pytest.raises(ProbeError, match="text features"):
        short = _text_probe(text)
        check_compatible(Probe(short.mean[:-1], short.scale[:-1], short.weight[:-1], 0.0, text=text,
                               scorer=scorer_block(INFO)), INFO, "p")
