"""A router that learns from its own traffic (issue #34): what is kept of a routed request, the durable store of
labelled examples, exploration, the learner (recalibration and a refit pulled toward the shipped probe, weighted
by inverse propensity, promoted only past a guard), the versioned probe registry, and the threshold controller
that holds a target. Everything here is off the request path: the gateway only records observations and asks
``explore`` and ``ThresholdController.threshold``; the learner runs in its own process or thread."""

from router.learning.examples import LabelledExample, Observation, pack_features, unit_hash, unpack_features
from router.learning.exploration import Explored, explore, propensity
from router.learning.learner import Learner, LearnerSettings, Outcome, learn
from router.learning.store import ExampleStore
from router.learning.target import Entry, TargetKind, ThresholdController, make_entry
from router.learning.versions import Registry, RegistryError, Version

__all__ = [
    "Entry",
    "ExampleStore",
    "Explored",
    "LabelledExample",
    "Learner",
    "LearnerSettings",
    "Observation",
    "Outcome",
    "Registry",
    "RegistryError",
    "TargetKind",
    "ThresholdController",
    "Version",
    "explore",
    "learn",
    "make_entry",
    "pack_features",
    "propensity",
    "unit_hash",
    "unpack_features",
]
