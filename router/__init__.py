"""probe-router: an OpenAI-compatible gateway that routes each request by a small scorer model's activations and
one linear probe per backend.

The public face of ``router`` for ``probes/``, ``loadtest/``, research code and embedding applications. Every name
is imported when first used, so ``import router`` costs nothing and loads neither the web stack nor torch. The
scorer has its own face, ``router.scorer``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from router.app import create_app
    from router.config import (
        BackendConfig,
        ConfigError,
        LearningConfig,
        PolicyConfig,
        ScorerConfig,
        Settings,
        TargetConfig,
        load_settings,
    )
    from router.errors import RouterError
    from router.policy import (
        Decision,
        Option,
        Reason,
        Rule,
        choose,
        choose_by_threshold,
        choose_by_utility,
        clear_decision,
        decision_radius,
        request_cost,
    )
    from router.probe import Probe, ProbeError, ProbeSet, check_compatible, load_probe, save_probe, scorer_block
    from router.request import CompletionCall, Resolver, Routable
    from router.routing import ProbeGroup, Router, load_probe_groups
    from router.text_features import TOKEN_PATTERN, TextFeatures, prompt_text

_EXPORTS = {
    "create_app": "app",
    "BackendConfig": "config", "ConfigError": "config", "PolicyConfig": "config", "ScorerConfig": "config",
    "Settings": "config", "load_settings": "config", "LearningConfig": "config", "TargetConfig": "config",
    "RouterError": "errors",
    "Decision": "policy", "Option": "policy", "Reason": "policy", "Rule": "policy", "choose": "policy",
    "clear_decision": "policy", "decision_radius": "policy", "choose_by_threshold": "policy",
    "choose_by_utility": "policy", "request_cost": "policy",
    "Probe": "probe", "ProbeError": "probe", "ProbeSet": "probe", "check_compatible": "probe", "load_probe": "probe",
    "save_probe": "probe", "scorer_block": "probe",
    "CompletionCall": "request", "Resolver": "request", "Routable": "request",
    "ProbeGroup": "routing", "Router": "routing", "load_probe_groups": "routing",
    "TOKEN_PATTERN": "text_features", "TextFeatures": "text_features", "prompt_text": "text_features",
}

__all__ = [
    "TOKEN_PATTERN",
    "BackendConfig",
    "CompletionCall",
    "ConfigError",
    "Decision",
    "LearningConfig",
    "Option",
    "PolicyConfig",
    "Probe",
    "ProbeError",
    "ProbeGroup",
    "ProbeSet",
    "Reason",
    "Resolver",
    "Routable",
    "Router",
    "RouterError",
    "Rule",
    "ScorerConfig",
    "Settings",
    "TargetConfig",
    "TextFeatures",
    "check_compatible",
    "choose",
    "choose_by_threshold",
    "choose_by_utility",
    "clear_decision",
    "create_app",
    "decision_radius",
    "load_probe",
    "load_probe_groups",
    "load_settings",
    "prompt_text",
    "request_cost",
    "save_probe",
    "scorer_block",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'router' has no attribute {name!r}")
    return getattr(importlib.import_module(f"router.{module}"), name)
