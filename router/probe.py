"""The probe file format, and turning features into calibrated success probabilities.

A probe is two files with one stem: ``NAME.json`` (everything but the vectors) and ``NAME.safetensors``
(float32 vectors ``mean``, ``scale`` and ``weight``, each of the scorer's feature size). For features ``x``::

    z = ((x - mean) / scale) · weight + bias          # standardised logistic regression
    p = 1 / (1 + exp(-(platt.a * z + platt.b)))       # Platt calibration of z

The JSON also records which scorer and feature recipe the probe was trained on (``scorer``: model, layers,
pooling, hidden_size, feature_dim, fingerprint), what it was trained on (``training``) and how well it did
(``metrics``). The gateway refuses a probe whose ``scorer`` block does not match its own scorer.

A version-2 probe also reads text features of the prompt (``router.text_features``): ``x`` is then
[activations ‖ TF-IDF ‖ log(1 + words)], the vectors are that long, and the file carries the vocabulary (JSON
``text_features.vocabulary``), the idf (tensor ``text_idf``) and their ``digest``, checked at load.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from router.scorer.recipe import Message, ScorerInfo
from router.text_features import TextFeatures, prompt_text

FORMAT = "probe-router/linear-probe"
VERSION = 1  # activations only
TEXT_VERSION = 2  # activations and text features


class ProbeError(Exception):
    """A probe file is unreadable, malformed, or was made for another scorer."""


@dataclass(frozen=True)
class Probe:
    mean: np.ndarray
    scale: np.ndarray
    weight: np.ndarray
    bias: float
    platt_a: float = 1.0
    platt_b: float = 0.0
    scorer: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    text: TextFeatures | None = None  # text features after the activations, if the probe reads them

    @property
    def text_dim(self) -> int:
        return self.text.dim if self.text is not None else 0

    def decision(self, x: np.ndarray) -> np.ndarray:
        """The uncalibrated logit z for each row of ``x``."""
        return ((np.asarray(x, dtype=np.float64) - self.mean) / self.scale) @ self.weight + self.bias

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Calibrated success probability for each row of ``x``."""
        return self.predict_logits(self.decision(x))

    def predict_logits(self, z: np.ndarray) -> np.ndarray:
        """Calibrated success probability for uncalibrated logits ``z``."""
        return _sigmoid(self.platt_a * np.asarray(z, dtype=np.float64) + self.platt_b)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # = 1 / (1 + e^-z), without overflow warnings


def save_probe(probe: Probe, path: str | Path) -> Path:
    """Write ``path`` (.json) and its .safetensors sibling; return the JSON path."""
    path = Path(path).with_suffix(".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = path.with_suffix(".safetensors")
    vectors = {"mean": probe.mean, "scale": probe.scale, "weight": probe.weight}
    if probe.text is not None:
        vectors["text_idf"] = probe.text.idf
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in vectors.items()}, str(tensors))
    doc = {
        "format": FORMAT,
        "version": VERSION if probe.text is None else TEXT_VERSION,
        "tensors": tensors.name,
        "bias": float(probe.bias),
        "platt": {"a": float(probe.platt_a), "b": float(probe.platt_b)},
        "scorer": probe.scorer,
        "training": probe.training,
        "metrics": probe.metrics,
    }
    if probe.text is not None:
        doc["text_features"] = probe.text.spec() | {"digest": probe.text.digest,
                                                     "vocabulary": list(probe.text.vocabulary)}
    path.write_text(json.dumps(doc, indent=2) + "\n")
    tensors.chmod(path.stat().st_mode & 0o777)  # safetensors writes 0600; readable like the JSON (an image's user)
    return path


def load_probe(path: str | Path) -> Probe:
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ProbeError(f"probe {path}: cannot read: {e}") from e
    if doc.get("format") != FORMAT or doc.get("version") not in (VERSION, TEXT_VERSION):
        raise ProbeError(f"probe {path}: not a {FORMAT} v{VERSION} or v{TEXT_VERSION} file")
    try:
        tensors = load_file(str(path.parent / doc["tensors"]))
        mean, scale, weight = (tensors[k].astype(np.float64) for k in ("mean", "scale", "weight"))
        bias, a, b = float(doc["bias"]), float(doc["platt"]["a"]), float(doc["platt"]["b"])
        text = _load_text(doc, tensors) if doc["version"] == TEXT_VERSION else None
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise ProbeError(f"probe {path}: malformed: {e!r}") from e
    if text is not None and text.digest != doc["text_features"].get("digest"):
        raise ProbeError(f"probe {path}: its text features do not match their digest (vocabulary, idf or recipe "
                         "changed)")
    if not (mean.shape == scale.shape == weight.shape) or mean.ndim != 1:
        raise ProbeError(f"probe {path}: mean, scale and weight must be vectors of one length")
    if np.any(scale <= 0) or not all(np.isfinite(v).all() for v in (mean, scale, weight)):
        raise ProbeError(f"probe {path}: scale must be positive and every value finite")
    return Probe(mean, scale, weight, bias, a, b, doc.get("scorer", {}), doc.get("training", {}),
                 doc.get("metrics", {}), text)


def _load_text(doc: dict[str, Any], tensors: dict[str, np.ndarray]) -> TextFeatures:
    block = doc["text_features"]
    if block.get("kind") not in ("tfidf", "tfidf+length"):
        raise ValueError(f"unknown text features {block.get('kind')!r}")
    return TextFeatures(tuple(str(t) for t in block["vocabulary"]), tensors["text_idf"].astype(np.float64),
                        ngram_max=int(block["ngram_max"]), length=block["kind"] == "tfidf+length")


def scorer_block(info: ScorerInfo) -> dict[str, Any]:
    """What a probe records about the scorer it was trained on."""
    return {
        "model": info.model,
        "layers": list(info.layers),
        "pooling": info.pooling,
        "final_norm": info.final_norm,
        "hidden_size": info.hidden_size,
        "feature_dim": info.feature_dim,
        "fingerprint": info.fingerprint,
        "recipe": info.recipe(),
    }


def check_compatible(probe: Probe, info: ScorerInfo, where: str) -> None:
    """Raise ProbeError naming every way ``probe`` disagrees with the configured scorer."""
    want = scorer_block(info)
    have = probe.scorer
    problems = [
        f"{key} is {have.get(key)!r} in the probe but {want[key]!r} in the scorer"
        for key in ("model", "layers", "pooling", "final_norm", "feature_dim", "fingerprint")
        if have.get(key) != want[key]
    ]
    if probe.weight.shape[0] != info.feature_dim + probe.text_dim:
        problems.append(f"the probe has {probe.weight.shape[0]} weights for {info.feature_dim} scorer features"
                        + (f" and {probe.text_dim} text features" if probe.text is not None else ""))
    if problems:
        raise ProbeError(
            f"{where} was trained for another scorer: " + "; ".join(problems)
            + ". Retrain it with `python -m probes train` or configure the scorer it was made for."
        )


class ProbeSet:
    """Several probes folded into one matrix, so every backend is scored with one product.

    Probes that read text features must share them (one vocabulary, one digest); a probe without them gets
    zero weight on them."""

    def __init__(self, names: Sequence[str], probes: Sequence[Probe]) -> None:
        self.names = list(names)
        texts = {p.text.digest: p.text for p in probes if p.text is not None}
        if len(texts) > 1:
            raise ProbeError(f"the probes of {', '.join(self.names)} read different text features "
                             f"({', '.join(sorted(texts))}); train them together")
        self.text = next(iter(texts.values()), None)
        width = max((p.weight.shape[0] - p.text_dim for p in probes), default=0)
        w = np.stack([_widen(p.weight / p.scale, width, p.text_dim, self.text) for p in probes])  # (k, d)
        self._w = w[:, :width].T.astype(np.float32)
        self._w_text = w[:, width:].T.astype(np.float64)  # (text dim, k)
        self._b = np.array([p.bias - float(p.mean @ (p.weight / p.scale)) for p in probes])
        self._a = np.array([p.platt_a for p in probes])
        self._c = np.array([p.platt_b for p in probes])

    def predict(self, x: np.ndarray, messages: Sequence[Message] = ()) -> dict[str, float]:
        """Features of one request (and its messages, for probes that read text features) → {backend: p}."""
        z = np.asarray(x, dtype=np.float32) @ self._w + self._b
        if self.text is not None:
            cols, vals = self.text.sparse_row(prompt_text(messages))
            z = z + vals @ self._w_text[cols]
        return dict(zip(self.names, _sigmoid(self._a * z + self._c).tolist(), strict=True))


def _widen(w: np.ndarray, width: int, text_dim: int, text: TextFeatures | None) -> np.ndarray:
    """A probe's folded weights laid out as [activations ‖ the set's text features] (zeros where it has none)."""
    if text is None or text_dim:
        return w
    return np.concatenate([w, np.zeros(text.dim)])
