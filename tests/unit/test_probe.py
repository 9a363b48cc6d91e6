from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from router.probe import Probe, ProbeError, ProbeSet, check_compatible, load_probe, save_probe, scorer_block
from router.scorer.recipe import ScorerInfo

INFO = ScorerInfo(model="m", layers=(2,), pooling="last", final_norm=True, hidden_size=2, feature_dim=2,
                  fingerprint="abc")


def hand_probe() -> Probe:
    return Probe(mean=np.array([1.0, 2.0]), scale=np.array([2.0, 4.0]), weight=np.array([1.0, -1.0]), bias=0.5,
                 platt_a=2.0, platt_b=-1.0, scorer=scorer_block(INFO))


def test_probe_maths_against_hand_computed_values() -> None:
    probe = hand_probe()
    # x = [3, 6]: standardised [1, 1]; z = 1 - 1 + 0.5 = 0.5; p = sigmoid(2·0.5 - 1) = 0.5
    # x = [5, 2]: standardised [2, 0]; z = 2 + 0.5 = 2.5; p = sigmoid(2·2.5 - 1) = sigmoid(4)
    x = np.array([[3.0, 6.0], [5.0, 2.0]])
    assert probe.decision(x) == pytest.approx([0.5, 2.5])
    assert probe.predict(x) == pytest.approx([0.5, 1 / (1 + math.exp(-4))])


def test_probe_set_folds_standardisation_without_changing_results() -> None:
    other = Probe(np.array([0.0, 1.0]), np.array([1.0, 0.5]), np.array([0.3, 0.2]), -0.1, 1.5, 0.2)
    x = np.array([0.7, -1.3])
    got = ProbeSet(["a", "b"], [hand_probe(), other]).predict(x)
    assert got["a"] == pytest.approx(float(hand_probe().predict(x[None])[0]), abs=1e-6)
    assert got["b"] == pytest.approx(float(other.predict(x[None])[0]), abs=1e-6)


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    path = save_probe(hand_probe(), tmp_path / "p.json")
    doc = json.loads(path.read_text())
    assert doc["tensors"] == "p.safetensors" and (tmp_path / "p.safetensors").is_file()
    assert doc["bias"] == 0.5 and doc["platt"] == {"a": 2.0, "b": -1.0}
    loaded = load_probe(path)
    x = np.array([[3.0, 6.0]])
    assert loaded.predict(x) == pytest.approx(hand_probe().predict(x))
    check_compatible(loaded, INFO, "p")


def test_a_probe_for_another_scorer_is_refused_with_the_reason(tmp_path: Path) -> None:
    path = save_probe(hand_probe(), tmp_path / "p.json")
    other = ScorerInfo(model="m", layers=(3,), pooling="last", final_norm=False, hidden_size=2, feature_dim=2,
                       fingerprint="def")
    with pytest.raises(ProbeError, match=r"layers is \[2\] in the probe but \[3\] in the scorer.*fingerprint"):
        check_compatible(load_probe(path), other, "backend x")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(format="other"), "not a probe-router/linear-probe"),
        (lambda d: d.pop("bias"), "malformed"),
        (lambda d: d.update(tensors="missing.safetensors"), "malformed"),
    ],
)
def test_malformed_probe_files_are_refused(tmp_path: Path, edit, message: str) -> None:  # type: ignore[no-untyped-def]
    path = save_probe(hand_probe(), tmp_path / "p.json")
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))
    with pytest.raises(ProbeError, match=message):
        load_probe(path)


def test_missing_probe_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ProbeError, match="cannot read"):
        load_probe(tmp_path / "nope.json")


def test_the_vectors_file_is_as_readable_as_the_json(tmp_path: Path) -> None:
    """safetensors writes 0600; an image built from the folder runs as another user and must read both."""
    path = save_probe(hand_probe(), tmp_path / "p.json")
    assert path.with_suffix(".safetensors").stat().st_mode & 0o777 == path.stat().st_mode & 0o777
