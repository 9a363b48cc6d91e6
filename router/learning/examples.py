"""What the gateway keeps of a routed request so that a rating can teach the probes: ``Observation`` (kept with
the answer remembered for feedback) and ``LabelledExample`` (an observation joined with its rating).

An observation holds what the answering backend's probe saw: the scorer's feature vector, stored as float16 (the
scorer computes in bfloat16 or float32; float16 keeps 10 bits of mantissa, enough for a linear probe: the logit
moves by far less than the probes' own error), and the prompt text when the probe also reads text features. It
also holds what the learner needs to weigh the label honestly: every probed backend's estimate, the probe
version that made them, where the policy sent the request and with what probability (``propensity``).

Size, for a probe at block 15 with ``last`` pooling (576 features): 1,152 bytes of features a request, 115 MB per
100,000 requests; ``last+mean`` (1,152 features): 2,304 bytes, 230 MB per 100,000; plus the prompt text when
kept, and about 200 bytes of the rest (``Observation.nbytes``).
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

FEATURE_DTYPE = np.float16


def pack_features(x: np.ndarray) -> bytes:
    """A feature vector as float16 bytes (little-endian)."""
    v = np.asarray(x, dtype=np.float32).ravel()
    if not np.isfinite(v).all():
        raise ValueError("features must be finite")
    return np.clip(v, -65504.0, 65504.0).astype("<f2").tobytes()


def unpack_features(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype="<f2").astype(np.float32)


@dataclass(frozen=True)
class Observation:
    """One routed request as its answer is remembered for feedback."""

    id: str  # the gateway's request id
    at: float  # unix time of the decision
    key: str  # the client key that sent it (the only one that may rate it)
    backend: str  # the backend that answered
    chosen: str  # the backend the policy chose (differs from ``backend`` when exploring)
    propensity: float  # probability that this request went to ``backend`` given its estimates (0 < π ≤ 1)
    estimates: Mapping[str, float]  # every probed backend's estimate at decision time
    versions: Mapping[str, str]  # the probe version that made each estimate
    fingerprint: str  # the scorer fingerprint of ``features`` (the answering backend's probe's scorer)
    features: bytes  # float16 feature vector (``pack_features``)
    text: str | None = None  # the prompt text (``router.text_features.prompt_text``) when a probe reads text
    meta: Mapping[str, Any] = field(default_factory=dict)  # anything else worth keeping (reason, threshold)

    def __post_init__(self) -> None:
        if not 0.0 < self.propensity <= 1.0:
            raise ValueError(f"propensity must be in (0, 1], not {self.propensity}")
        if len(self.features) % 2:
            raise ValueError("features must be float16 bytes")

    @classmethod
    def make(cls, *, id: str, at: float, key: str, backend: str, chosen: str, propensity: float,
             estimates: Mapping[str, float], versions: Mapping[str, str], fingerprint: str, features: np.ndarray,
             text: str | None = None, meta: Mapping[str, Any] | None = None) -> Observation:
        return cls(id, float(at), key, backend, chosen, float(propensity), dict(estimates), dict(versions),
                   fingerprint, pack_features(features), text, dict(meta or {}))

    @property
    def vector(self) -> np.ndarray:
        return unpack_features(self.features)

    @property
    def nbytes(self) -> int:
        """Bytes of its JSON form (what Redis or the store keeps, roughly)."""
        return len(self.to_json())

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "at": self.at, "key": self.key, "backend": self.backend, "chosen": self.chosen,
                "propensity": self.propensity, "estimates": dict(self.estimates), "versions": dict(self.versions),
                "fingerprint": self.fingerprint, "features": base64.b64encode(self.features).decode("ascii"),
                "text": self.text, "meta": dict(self.meta)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Observation:
        return cls(str(d["id"]), float(d["at"]), str(d["key"]), str(d["backend"]), str(d["chosen"]),
                   float(d["propensity"]), {str(k): float(v) for k, v in d["estimates"].items()},
                   {str(k): str(v) for k, v in d["versions"].items()}, str(d["fingerprint"]),
                   base64.b64decode(d["features"]), d.get("text"), dict(d.get("meta") or {}))

    @classmethod
    def from_json(cls, text: str | bytes) -> Observation:
        return cls.from_dict(json.loads(text))

    def rated(self, label: float, *, rated_at: float) -> LabelledExample:
        """This observation joined with its rating (``label``: 1 right, 0 wrong, or a score in between)."""
        return LabelledExample(self, float(label), float(rated_at))


@dataclass(frozen=True)
class LabelledExample:
    """An observation and its rating: whether ``observation.backend``'s answer was right (a partial label: it says
    nothing about the other backends)."""

    observation: Observation
    label: float  # in [0, 1]
    rated_at: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.label <= 1.0:
            raise ValueError(f"label must be in [0, 1], not {self.label}")

    @property
    def id(self) -> str:
        return self.observation.id

    @property
    def backend(self) -> str:
        return self.observation.backend

    @property
    def key(self) -> str:
        return self.observation.key

    def with_label(self, label: float) -> LabelledExample:
        return replace(self, label=float(label))


def unit_hash(text: str, salt: str = "") -> float:
    """A stable number in [0, 1) for ``text`` (the guard slice and the folds are drawn by it, so an example
    stays on its side of every split across refits and restarts)."""
    digest = hashlib.blake2b(f"{salt}\x1f{text}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64
