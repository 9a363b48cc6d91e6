"""What a probe must agree with: the feature recipe, and the scorer's description of itself. No torch here.

A feature is the residual stream of the scorer model after block ``layer`` (counting from 1), read at the last
prompt token (``last``), averaged over the prompt (``mean``), or both side by side, for each configured layer.
With ``final_norm`` the model's own final RMSNorm is applied to it first: that is what a vLLM server running the
model cut after that block returns (vLLM builds the norm after the last layer it builds), so a probe trained on
either implementation's features works with the other. The recipe and the weights are in the fingerprint that
every probe records and the gateway checks at load.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

FEATURE_VERSION = 2  # bump when the recipe changes meaning (2: the final norm is part of the recipe)

Message = Mapping[str, Any]


def message_text(content: Any) -> str:
    """OpenAI message content (a string, a list of parts, or None) as plain text: the text of its text parts
    (``text``, and ``input_text``/``output_text`` as the Responses API names them) and refusal parts, one per
    line; image, audio and file parts have no text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, Mapping):
                if isinstance(part.get("text"), str):
                    parts.append(part["text"])
                elif part.get("type") == "refusal" and isinstance(part.get("refusal"), str):
                    parts.append(part["refusal"])
        return "\n".join(parts)
    return str(content)


def normalise_messages(messages: Sequence[Message]) -> list[dict[str, str]]:
    """Roles and plain-text contents as the chat template reads them: ``developer`` is a system message, an
    assistant message with no content but a ``refusal`` reads as its refusal, and what carries no text (tool
    calls, names, images) reads as nothing. Never fails on a message that is a mapping."""
    out = []
    for m in messages:
        role = str(m.get("role") or "user")
        text = message_text(m.get("content"))
        if not text and isinstance(m.get("refusal"), str):
            text = m["refusal"]
        out.append({"role": "system" if role == "developer" else role, "content": text})
    return out


@dataclass(frozen=True)
class ScorerInfo:
    """What a probe must agree with to be used on a scorer's features."""

    model: str
    layers: tuple[int, ...]
    pooling: str
    final_norm: bool
    hidden_size: int
    feature_dim: int
    fingerprint: str

    def recipe(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "pooling": self.pooling, "final_norm": self.final_norm,
                "version": FEATURE_VERSION}


def describe(*, model: str, weights_sha256: str, template: str | None, layers: Sequence[int], pooling: str,
             final_norm: bool, hidden_size: int) -> ScorerInfo:
    """The ScorerInfo of a model (by its weights' digest and chat template) read with a recipe."""
    recipe = {
        "weights": weights_sha256,
        "layers": list(layers),
        "pooling": pooling,
        "final_norm": final_norm,
        "template": template,
        "version": FEATURE_VERSION,
    }
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    per_layer = 2 if pooling == "last+mean" else 1
    return ScorerInfo(model=model, layers=tuple(layers), pooling=pooling, final_norm=final_norm,
                      hidden_size=hidden_size, feature_dim=hidden_size * len(layers) * per_layer, fingerprint=digest)
