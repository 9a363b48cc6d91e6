"""The one feature function: chat messages → the scorer's pooled hidden state(s).

The gateway calls it for every routed request and ``probes/`` calls it to build training data, so a probe is
always trained on exactly what it will see. Everything here is blocking; the gateway runs it in a worker
thread (see ``batcher``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from router.config import ScorerConfig
from router.scorer.source import resolve_model

log = logging.getLogger(__name__)

FEATURE_VERSION = 1  # bump when the recipe below changes meaning

Message = Mapping[str, Any]


def message_text(content: Any) -> str:
    """OpenAI message content (a string, a list of parts, or None) as plain text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, Mapping) and isinstance(part.get("text"), str):
                parts.append(part["text"])
        return "\n".join(parts)
    return str(content)


def normalise_messages(messages: Sequence[Message]) -> list[dict[str, str]]:
    out = []
    for m in messages:
        role = str(m.get("role", "user"))
        out.append({"role": "system" if role == "developer" else role, "content": message_text(m.get("content"))})
    return out


@dataclass(frozen=True)
class ScorerInfo:
    """What a probe must agree with to be used on this scorer's features."""

    model: str
    layers: tuple[int, ...]
    pooling: str
    hidden_size: int
    feature_dim: int
    fingerprint: str

    def recipe(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "pooling": self.pooling, "version": FEATURE_VERSION}


class FeatureExtractor:
    """A causal LM cut after its last needed layer, reading the residual stream at the prompt's end."""

    def __init__(self, cfg: ScorerConfig) -> None:
        from transformers import AutoConfig, AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        self.cfg = cfg
        folder = resolve_model(cfg.model, cfg.cache_dir)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        model_cfg = AutoConfig.from_pretrained(folder.path)
        text_cfg = model_cfg.get_text_config()
        depth = max(cfg.layers)
        if depth > text_cfg.num_hidden_layers:
            raise ValueError(
                f"scorer.layers asks for layer {depth} but {folder.name} has {text_cfg.num_hidden_layers}"
            )
        text_cfg.num_hidden_layers = depth  # the blocks after the deepest probed layer are never loaded
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # unused-weight warnings for the dropped blocks are expected
        try:
            model = AutoModel.from_pretrained(folder.path, config=model_cfg, dtype=getattr(torch, cfg.dtype))
        finally:
            hf_logging.set_verbosity(verbosity)
        model.norm = torch.nn.Identity()  # read the raw residual stream, as the final block leaves it
        self.model = model.to(cfg.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(folder.path)
        self.tokenizer.padding_side = "right"
        self.tokenizer.truncation_side = "left"  # keep the end of a long prompt: the question and the turn
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # the most characters one token can stand for (byte-level vocabularies spell a byte as one character)
        self._max_token_chars = max(len(t) for t in self.tokenizer.get_vocab())
        hidden = int(text_cfg.hidden_size)
        per_layer = 2 if cfg.pooling == "last+mean" else 1
        recipe = {
            "weights": folder.weights_sha256,
            "layers": list(cfg.layers),
            "pooling": cfg.pooling,
            "template": self.tokenizer.chat_template,
            "version": FEATURE_VERSION,
        }
        digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
        self.info = ScorerInfo(
            model=folder.name,
            layers=tuple(cfg.layers),
            pooling=cfg.pooling,
            hidden_size=hidden,
            feature_dim=hidden * len(cfg.layers) * per_layer,
            fingerprint=digest,
        )

    def render(self, messages: Sequence[Message]) -> str:
        """The prompt exactly as the scorer reads it: the chat template with the generation prompt."""
        return self.tokenizer.apply_chat_template(
            self._bounded(normalise_messages(messages)), tokenize=False, add_generation_prompt=True
        )

    def _bounded(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        """The messages cut, keeping their end, to what can still reach the last ``max_prompt_tokens`` tokens, so
        that a huge prompt is never rendered or tokenised whole. Each message renders to at least one token and
        each token covers at most ``_max_token_chars`` characters, so a prompt within the limit is never cut
        (its features stay exactly what they were), and a longer one keeps more than the tokens it is scored on."""
        limit = self.cfg.max_prompt_tokens
        if len(messages) > limit:
            messages = messages[-limit:]
        budget = limit * self._max_token_chars
        if sum(len(m["content"]) for m in messages) <= budget:
            return messages
        kept = []
        for m in reversed(messages):
            text = m["content"][len(m["content"]) - budget:] if budget > 0 else ""
            budget -= len(text)
            kept.append({"role": m["role"], "content": text})
        return kept[::-1]

    def token_count(self, prompt: str) -> int:
        return len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])

    @torch.inference_mode()
    def features_from_prompts(self, prompts: Sequence[str]) -> np.ndarray:
        """Rendered prompts → features, shape (len(prompts), feature_dim), float32."""
        if not prompts:
            return np.zeros((0, self.info.feature_dim), dtype=np.float32)
        enc = self.tokenizer(
            list(prompts),
            add_special_tokens=False,
            padding=True,
            truncation=True,
            max_length=self.cfg.max_prompt_tokens,
            return_tensors="pt",
        ).to(self.cfg.device)
        out = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], output_hidden_states=True)
        mask = enc["attention_mask"].unsqueeze(-1).to(torch.float32)
        last = enc["attention_mask"].sum(dim=1) - 1  # right padding: the last real token of each row
        rows = torch.arange(len(prompts), device=last.device)
        pooled = []
        for layer in self.cfg.layers:
            h = out.hidden_states[layer].to(torch.float32)  # hidden_states[0] is the embeddings
            if self.cfg.pooling in ("last", "last+mean"):
                pooled.append(h[rows, last])
            if self.cfg.pooling in ("mean", "last+mean"):
                pooled.append((h * mask).sum(dim=1) / mask.sum(dim=1))
        return torch.cat(pooled, dim=-1).cpu().numpy()

    def features(self, conversations: Sequence[Sequence[Message]]) -> np.ndarray:
        """The feature function: conversations (OpenAI messages) → features."""
        return self.features_from_prompts([self.render(c) for c in conversations])
