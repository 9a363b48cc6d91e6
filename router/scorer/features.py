"""The in-process feature function: conversations → the scorer model's pooled hidden state(s), with torch.

The local scorer (``router.scorer.local``) runs it for every routed request in a worker thread, and
``probes/`` extracts training features through the same scorer interface, so a probe is always trained on
exactly what it will see. Rendering and tokenising are ``router.scorer.prompt``'s, shared with the vLLM scorer;
the recipe (layers, pooling, final norm) is ``router.scorer.recipe``'s. Everything here is blocking.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from router.config import ScorerConfig
from router.scorer.cpu import compute_dtype
from router.scorer.interface import Chunk, EarlyExit
from router.scorer.packed import SUPPORTED_MODEL_TYPES, PackedDecoder
from router.scorer.prompt import PromptEncoder
from router.scorer.recipe import Message, ScorerInfo, describe
from router.scorer.source import resolve_model

log = logging.getLogger(__name__)


class FeatureExtractor:
    """A causal LM cut after its deepest probed block, reading the residual stream of the prompt."""

    def __init__(self, cfg: ScorerConfig) -> None:
        from transformers import AutoConfig, AutoModel
        from transformers.utils import logging as hf_logging

        self.cfg = cfg
        self.dtype = compute_dtype(cfg)  # 'auto' resolved for this machine
        log.info("scorer pass in %s%s", self.dtype,
                 " (dtype auto: bf16 only where the CPU multiplies it natively)" if cfg.dtype == "auto" else "")
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
            model = AutoModel.from_pretrained(folder.path, config=model_cfg, dtype=getattr(torch, self.dtype))
        finally:
            hf_logging.set_verbosity(verbosity)
        # hidden_states[layer] must be the raw residual stream after that block; the final norm, when the recipe
        # asks for it, is applied below to each probed layer alike (as vLLM applies it after its last block).
        self.final_norm = model.norm.to(cfg.device).eval() if cfg.final_norm else None
        model.norm = torch.nn.Identity()
        self.model = model.to(cfg.device).eval()
        self.encoder = PromptEncoder(folder.path, cfg.max_prompt_tokens, conversation=cfg.conversation,
                                     context_tokens=cfg.context_tokens)
        self.packed: PackedDecoder | None = None
        if cfg.packing and PackedDecoder.supports(self.model):
            self.packed = PackedDecoder(self.model, layers=cfg.layers, pooling=cfg.pooling,
                                        final_norm=self.final_norm, prefix=self.encoder.shared_prefix())
        elif cfg.packing:
            log.info("scorer %s (%s) runs padded: packing supports %s", folder.name,
                     getattr(model_cfg, "model_type", "?"), ", ".join(SUPPORTED_MODEL_TYPES))
        self._weights_sha256 = folder.weights_sha256
        self._early_infos: dict[int, ScorerInfo] = {}
        self.info: ScorerInfo = describe(
            model=folder.name, weights_sha256=folder.weights_sha256, template=self.encoder.template,
            layers=cfg.layers, pooling=cfg.pooling, final_norm=cfg.final_norm, hidden_size=int(text_cfg.hidden_size))

    @torch.inference_mode()
    def features_from_ids(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        """Token ids (one list per prompt) → features, shape (len(batch), feature_dim), float32."""
        if not batch:
            return np.zeros((0, self.info.feature_dim), dtype=np.float32)
        if self.packed is not None:
            return self.packed.features(batch).numpy()
        return self.padded_features(batch)

    def early_exit_info(self, layer: int) -> ScorerInfo | None:
        """The recipe of the features an early exit at ``layer`` gives (a scorer configured with ``layers:
        [layer]`` gives the same), or None where the pass cannot stop there (padded, or not before the deepest
        configured layer)."""
        if self.packed is None or layer not in self.packed.exit_layers:
            return None
        if layer not in self._early_infos:
            self._early_infos[layer] = describe(
                model=self.info.model, weights_sha256=self._weights_sha256, template=self.encoder.template,
                layers=[layer], pooling=self.cfg.pooling, final_norm=self.cfg.final_norm,
                hidden_size=self.info.hidden_size)
        return self._early_infos[layer]

    @property
    def chunks(self) -> bool:
        """Whether a long prompt's pass can run in chunks (``Chunk``; the packed pass only)."""
        return self.packed is not None

    @torch.inference_mode()
    def staged_features_from_ids(self, batch: Sequence[Sequence[int] | Chunk], exits: Sequence[EarlyExit | None]
                                 ) -> list[tuple[np.ndarray | None, np.ndarray | None]]:
        """Per prompt, (its features at its early exit, or None without one; its configured features, or None where
        its exit stopped the pass). Exits this pass cannot take (``early_exit_info`` None) are ignored: those
        prompts get their configured features and no early ones. A prompt may be a chunk of a long one (where
        ``chunks``): it takes no exit, and gives (None, None) unless it is its prompt's last."""
        if len(exits) != len(batch):
            raise ValueError(f"{len(exits)} exits for {len(batch)} prompts")
        exits = [e if e is not None and self.early_exit_info(e.layer) is not None and not isinstance(piece, Chunk)
                 else None for e, piece in zip(exits, batch, strict=True)]
        chunked = any(isinstance(piece, Chunk) for piece in batch)
        if chunked and self.packed is None:
            raise ValueError("a chunk of a long prompt: only the packed pass runs prompts in chunks")
        if self.packed is None or not (chunked or any(exits)):
            return [(None, row) for row in self.features_from_ids(batch)]  # type: ignore[arg-type]
        return self.packed.staged_features(batch, exits)

    @torch.inference_mode()
    def padded_features(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        """transformers' own forward pass over the batch padded to its longest prompt (the reference, and the
        pass for architectures ``PackedDecoder`` does not support)."""
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), self.encoder.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):  # right padding: each prompt's tokens first
            input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[row, :len(ids)] = 1
        input_ids, mask = input_ids.to(self.cfg.device), mask.to(self.cfg.device)
        out = self.model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
        weights = mask.unsqueeze(-1).to(torch.float32)
        last = mask.sum(dim=1) - 1
        rows = torch.arange(len(batch), device=last.device)
        pooled = []
        for layer in self.cfg.layers:
            h = out.hidden_states[layer]  # hidden_states[0] is the embeddings
            if self.final_norm is not None:
                h = self.final_norm(h)
            h = h.to(torch.float32)
            if self.cfg.pooling in ("last", "last+mean"):
                pooled.append(h[rows, last])
            if self.cfg.pooling in ("mean", "last+mean"):
                pooled.append((h * weights).sum(dim=1) / weights.sum(dim=1))
        return torch.cat(pooled, dim=-1).cpu().numpy()

    def features(self, conversations: Sequence[Sequence[Message]]) -> np.ndarray:
        """The feature function: conversations (OpenAI messages) → features."""
        return self.features_from_ids([self.encoder.encode(c) for c in conversations])
