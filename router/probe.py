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

A version-3 file also carries the backend's cascade stages (``stages``): cheaper models of the same success,
fitted on the same data and labels and calibrated the same way, that decide a request before the full pass when
their decision is clear (``router.policy.clear_decision``):

- ``text``: the text features alone (TF-IDF ‖ log(1 + words)), no scorer pass at all;
- ``early``: the scorer's features at a shallow block (its ``scorer`` block records that recipe and fingerprint,
  checked against the scorer's early exit by ``check_early_compatible``), with the text features if the full
  probe reads them.

A stage is stored with its standardisation folded in (tensor ``stage.NAME.weight``, JSON ``stages.NAME.bias``:
``z = x · weight + bias``). The file holds one vocabulary and idf for all its models (``reads_text_features``
says which read them), and ``cascade``: the margins the stages decide with, chosen on held-out estimates for the
policy it names (``probes train``), with the margins for other thresholds (``by_threshold``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from router.scorer.recipe import Message, ScorerInfo
from router.text_features import TextFeatures, prompt_text

FORMAT = "probe-router/linear-probe"
VERSION = 1  # activations only
TEXT_VERSION = 2  # activations and text features
CASCADE_VERSION = 3  # and cheaper models of the same success, the cascade's stages
STAGES = ("text", "early")  # in the order a cascade asks them


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
    stages: Mapping[str, Probe] = field(default_factory=dict)  # the cascade's cheaper models ("text", "early")
    cascade: Mapping[str, Any] = field(default_factory=dict)  # the margins they decide with, and what for

    @property
    def text_dim(self) -> int:
        return self.text.dim if self.text is not None else 0

    @property
    def early_layer(self) -> int | None:
        """The scorer block the early stage reads (None without one)."""
        early = self.stages.get("early")
        return None if early is None else int(max(early.scorer["layers"]))

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
    text = _shared_text(probe)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = path.with_suffix(".safetensors")
    vectors = {"mean": probe.mean, "scale": probe.scale, "weight": probe.weight}
    if text is not None:
        vectors["text_idf"] = text.idf
    cascade = bool(probe.stages or probe.cascade)
    stages = {}
    for name, stage in probe.stages.items():
        folded = _folded(stage)
        vectors[f"stage.{name}.weight"] = folded.weight
        stages[name] = {"bias": folded.bias, "platt": {"a": float(stage.platt_a), "b": float(stage.platt_b)},
                        "reads_text_features": stage.text is not None, "scorer": stage.scorer or None,
                        "training": stage.training, "metrics": stage.metrics}
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in vectors.items()}, str(tensors))
    doc: dict[str, Any] = {
        "format": FORMAT,
        "version": CASCADE_VERSION if cascade else VERSION if probe.text is None else TEXT_VERSION,
        "tensors": tensors.name,
        "bias": float(probe.bias),
        "platt": {"a": float(probe.platt_a), "b": float(probe.platt_b)},
        "scorer": probe.scorer,
        "training": probe.training,
        "metrics": probe.metrics,
    }
    if cascade:
        doc["reads_text_features"] = probe.text is not None
        doc["stages"] = stages
        doc["cascade"] = dict(probe.cascade)
    if text is not None:
        doc["text_features"] = text.spec() | {"digest": text.digest, "vocabulary": list(text.vocabulary)}
    path.write_text(json.dumps(doc, indent=2) + "\n")
    tensors.chmod(path.stat().st_mode & 0o777)  # safetensors writes 0600; readable like the JSON (an image's user)
    return path


def _shared_text(probe: Probe) -> TextFeatures | None:
    """The one set of text features the probe and its stages read (a file holds one vocabulary)."""
    texts = {p.text.digest: p.text for p in (probe, *probe.stages.values()) if p.text is not None}
    if len(texts) > 1:
        raise ProbeError(f"a probe and its stages must read the same text features, not {', '.join(sorted(texts))}")
    return next(iter(texts.values()), None)


def _folded(probe: Probe) -> Probe:
    """The same model with its standardisation folded into the weights (mean 0, scale 1)."""
    w = probe.weight / probe.scale
    n = len(w)
    return replace(probe, mean=np.zeros(n), scale=np.ones(n), weight=w, bias=float(probe.bias - probe.mean @ w))


def load_probe(path: str | Path) -> Probe:
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ProbeError(f"probe {path}: cannot read: {e}") from e
    versions = (VERSION, TEXT_VERSION, CASCADE_VERSION)
    if doc.get("format") != FORMAT or doc.get("version") not in versions:
        raise ProbeError(f"probe {path}: not a {FORMAT} file of version {', '.join(map(str, versions))}")
    try:
        tensors = load_file(str(path.parent / doc["tensors"]))
        mean, scale, weight = (tensors[k].astype(np.float64) for k in ("mean", "scale", "weight"))
        bias, a, b = float(doc["bias"]), float(doc["platt"]["a"]), float(doc["platt"]["b"])
        text = _load_text(doc, tensors) if "text_features" in doc else None
        reads_text = doc["version"] == TEXT_VERSION or (doc["version"] == CASCADE_VERSION
                                                         and bool(doc["reads_text_features"]))
        stages = {name: _load_stage(name, block, tensors, text)
                  for name, block in (doc.get("stages") or {}).items()}
    except (OSError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise ProbeError(f"probe {path}: malformed: {e!r}") from e
    if text is not None and text.digest != doc["text_features"].get("digest"):
        raise ProbeError(f"probe {path}: its text features do not match their digest (vocabulary, idf or recipe "
                         "changed)")
    if reads_text and text is None:
        raise ProbeError(f"probe {path}: it reads text features but carries none")
    for name, model in [("", Probe(mean, scale, weight, bias)), *stages.items()]:
        what = f"probe {path}" + (f", stage {name}," if name else "")
        if not (model.mean.shape == model.scale.shape == model.weight.shape) or model.mean.ndim != 1:
            raise ProbeError(f"{what}: mean, scale and weight must be vectors of one length")
        if np.any(model.scale <= 0) or not all(np.isfinite(v).all() for v in (model.mean, model.scale, model.weight)):
            raise ProbeError(f"{what}: scale must be positive and every value finite")
        if not np.isfinite([model.bias, model.platt_a, model.platt_b]).all():
            raise ProbeError(f"{what}: bias and calibration must be finite")
    return Probe(mean, scale, weight, bias, a, b, doc.get("scorer", {}), doc.get("training", {}),
                 doc.get("metrics", {}), text if reads_text else None, stages, doc.get("cascade") or {})


def _load_stage(name: str, block: dict[str, Any], tensors: dict[str, np.ndarray], text: TextFeatures | None) -> Probe:
    weight = tensors[f"stage.{name}.weight"].astype(np.float64)
    if block["reads_text_features"] and text is None:
        raise ValueError(f"stage {name} reads text features but the file carries none")
    return Probe(np.zeros(len(weight)), np.ones(len(weight)), weight, float(block["bias"]),
                 float(block["platt"]["a"]), float(block["platt"]["b"]), block.get("scorer") or {},
                 block.get("training") or {}, block.get("metrics") or {},
                 text if block["reads_text_features"] else None)


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


def check_early_compatible(probe: Probe, info: ScorerInfo | None, where: str) -> None:
    """Raise ProbeError unless ``probe``'s early stage reads exactly the features ``info`` describes: what the
    scorer returns when it stops its pass at that block (``Scorer.early_exit_info(probe.early_layer)``, which is
    the description of a scorer configured with ``layers: [that block]`` and the same pooling and final norm;
    None where the scorer cannot stop there)."""
    stage = probe.stages.get("early")
    if stage is None:
        raise ProbeError(f"{where} has no early stage; retrain it with `python -m probes train` (cascade on)")
    if info is None:
        raise ProbeError(f"{where}: its early stage reads block {probe.early_layer}, where this scorer cannot stop "
                         "its pass")
    check_compatible(stage, info, f"the early stage (block {probe.early_layer}) of {where}")


TextRow = tuple[np.ndarray, np.ndarray]  # a prompt's text features: (column indices, values)


class _Folded:
    """Several backends' linear models as one matrix: one product scores them all."""

    def __init__(self, probes: Sequence[Probe], text: TextFeatures | None) -> None:
        width = max((p.weight.shape[0] - p.text_dim for p in probes), default=0)
        w = np.stack([_widen(p.weight / p.scale, width, p.text_dim, text) for p in probes])  # (k, d)
        self.width = width
        self._w = w[:, :width].T.astype(np.float32)
        self._w_text = w[:, width:].T.astype(np.float64)  # (text dim, k)
        self.reads_text = any(p.text is not None for p in probes)
        self._b = np.array([p.bias - float(p.mean @ (p.weight / p.scale)) for p in probes])
        self._a = np.array([p.platt_a for p in probes])
        self._c = np.array([p.platt_b for p in probes])

    def digest(self) -> bytes:
        """What these models compute, as bytes (for ``ProbeSet.version``)."""
        parts = (self._w, self._w_text, self._b, self._a, self._c)
        return b"".join(np.ascontiguousarray(v, dtype=np.float64).tobytes() for v in parts)

    def predict(self, x: np.ndarray | None, row: TextRow | None) -> np.ndarray:
        z = self._b if x is None or not self.width else np.asarray(x, dtype=np.float32) @ self._w + self._b
        if self.reads_text and row is not None:
            cols, vals = row
            z = z + vals @ self._w_text[cols]
        return _sigmoid(self._a * z + self._c)


class ProbeSet:
    """Several probes folded into one matrix, so every backend is scored with one product; likewise each cascade
    stage that every probe has (``stages``).

    Probes that read text features must share them (one vocabulary, one digest); a probe without them gets
    zero weight on them. A request's text features are computed once (``text_row``) and serve every backend
    and every stage."""

    def __init__(self, names: Sequence[str], probes: Sequence[Probe]) -> None:
        self.names = list(names)
        self.probes = tuple(probes)  # as given, one per name
        texts = {m.text.digest: m.text for p in probes for m in (p, *p.stages.values()) if m.text is not None}
        if len(texts) > 1:
            raise ProbeError(f"the probes of {', '.join(self.names)} read different text features "
                             f"({', '.join(sorted(texts))}); train them together")
        self.text = next(iter(texts.values()), None)
        self._full = _Folded(probes, self.text)
        self.stages = tuple(s for s in STAGES if probes and all(s in p.stages for p in probes))
        self._stages = {s: _Folded([p.stages[s] for p in probes], self.text) for s in self.stages}
        self._cascade = [p.cascade for p in probes if p.cascade]
        early = {p.early_layer for p in probes}
        self.early_layer = early.pop() if "early" in self.stages and len(early) == 1 else None
        h = hashlib.sha256("\x1e".join(self.names).encode())
        for models in (self._full, *self._stages.values()):
            h.update(models.digest())
        self.version = h.hexdigest()[:16]  # changes whenever any estimate could (a retrained or promoted probe)
        if "early" in self.stages and self.early_layer is None:
            raise ProbeError(f"the early stages of {', '.join(self.names)} read different blocks; train them together")

    def text_row(self, messages: Sequence[Message]) -> TextRow | None:
        """The text features of a request's messages, for ``row=`` (None when no model here reads them)."""
        return None if self.text is None else self.text.sparse_row(prompt_text(messages))

    def predict(self, x: np.ndarray, messages: Sequence[Message] = (), *, row: TextRow | None = None
                ) -> dict[str, float]:
        """Features of one request (and its messages, or their ``text_row``, for probes that read text features)
        → {backend: p}."""
        return self._named(self._full.predict(x, self._row(self._full, messages, row)))

    def predict_text(self, messages: Sequence[Message] = (), *, row: TextRow | None = None) -> dict[str, float]:
        """Every backend's estimate from the text of its messages alone (stage ``text``; microseconds)."""
        stage = self._stage("text")
        return self._named(stage.predict(None, self._row(stage, messages, row)))

    def predict_early(self, x: np.ndarray, messages: Sequence[Message] = (), *, row: TextRow | None = None
                      ) -> dict[str, float]:
        """Every backend's estimate from the scorer's features at block ``early_layer`` (stage ``early``)."""
        stage = self._stage("early")
        return self._named(stage.predict(x, self._row(stage, messages, row)))

    def margins(self, threshold: float | None = None) -> dict[str, float]:
        """The margin each stage decides with (``router.policy.clear_decision``'s error): the probes' own, chosen
        for the policy their ``cascade`` block names, or, given a threshold other than the one they were chosen
        for (threshold mode), the larger of the two chosen for the nearest thresholds below and above it. Where
        the probe files disagree, the largest. A stage without a margin is absent."""
        out: dict[str, float] = {}
        for block in self._cascade:
            for stage, margin in cascade_margins(block, threshold).items():
                out[stage] = max(out.get(stage, margin), margin)
        return {s: m for s, m in out.items() if s in self.stages}

    def _stage(self, name: str) -> _Folded:
        if name not in self._stages:
            raise ProbeError(f"not every probe of {', '.join(self.names)} has a {name} stage")
        return self._stages[name]

    def _row(self, models: _Folded, messages: Sequence[Message], row: TextRow | None) -> TextRow | None:
        """The text row ``models`` read (computed here unless given; None if they read none)."""
        if row is not None or self.text is None or not models.reads_text:
            return row
        return self.text.sparse_row(prompt_text(messages))

    def _named(self, p: np.ndarray) -> dict[str, float]:
        return dict(zip(self.names, p.tolist(), strict=True))


def cascade_margins(block: Mapping[str, Any], threshold: float | None = None) -> dict[str, float]:
    """{stage: margin} from a probe file's ``cascade`` block: those chosen for its policy, or, for another
    ``threshold`` (threshold mode), the larger of those chosen for the nearest thresholds of ``by_threshold``
    on either side."""
    chosen = {s: float(m) for s, m in (block.get("margins") or {}).items() if m is not None}
    policy = block.get("policy") or {}
    table = block.get("by_threshold") or []
    if threshold is None or policy.get("mode") != "threshold" or threshold == policy.get("threshold") or not table:
        return chosen
    below = [e for e in table if e["threshold"] <= threshold]
    above = [e for e in table if e["threshold"] >= threshold]
    near = [max(below, key=lambda e: e["threshold"])] if below else []
    near += [min(above, key=lambda e: e["threshold"])] if above else []
    out: dict[str, float] = {}
    for entry in near:
        for stage, m in (entry.get("margins") or {}).items():
            if m is not None:
                out[stage] = max(out.get(stage, float(m)), float(m))
    return out


def _widen(w: np.ndarray, width: int, text_dim: int, text: TextFeatures | None) -> np.ndarray:
    """A probe's folded weights laid out as [activations ‖ the set's text features] (zeros where it has none)."""
    if text is None or text_dim:
        return w
    return np.concatenate([w, np.zeros(text.dim)])
