"""Research comparison (not part of the package): the context tokens exit the pass early (issue 14, dropped).

Usage, from the repository root:
    .venv/bin/python research/probes/context_exit.py --data data/gsm8k_test_qwen25math.jsonl --exit-after 8 10

The idea: the probe reads one position, the prompt's last, at block 15. Every other position runs blocks 1..F
only; after that its state is frozen, and each later block computes only its keys and values from the frozen
state (two narrow projections, about 6% of a block's arithmetic), while the last position alone runs the whole
block, attending to them. Blocks 1..F plus that would cost about F + 0.06·(15 − F) blocks instead of 15. With
F = 14 this is exactly the shipped pass (checked below). Each variant is compared with the shipped recipe
(block 15, last token) through the pipeline's nested cross-validation, paired on the same questions, for three
seeds, the 7B probe trained on the 1.5B model's labels as shipped. Prints one JSON line per variant and seed:
[AUROC shipped, AUROC variant, difference, 95% paired-bootstrap interval] per backend.
"""
import argparse
import json

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from probes import held_out, load_dataset, probe_inputs, probe_model
from router import load_settings
from router.scorer import FeatureExtractor, PackedDecoder, configure_openmp, rotate


class ContextExitDecoder(PackedDecoder):
    """The packed pass, with every position but each prompt's last frozen after block ``exit_after``."""

    exit_after = 8

    def _run(self, token_ids, positions, packing, *, prefix, keep_kv=None, sums_only=False):
        x = self.embed(token_ids)
        cos, sin = self.rotary(x[None], positions[None])
        cos, sin = cos[0, :, None], sin[0, :, None]
        masks = packing.masks() if prefix is not None else [None] * len(packing.starts)
        q_width, kv_width = self.heads * self.head_dim, self.kv_heads * self.head_dim
        last = packing.last_rows
        h = None
        for index, block in enumerate(self.blocks):
            if index + 1 <= self.exit_after:
                x = self._block(index, block, x, cos, sin, packing, masks, prefix, False, keep_kv)
                continue
            weight, bias = self.qkv[index].weight, self.qkv[index].bias
            kv = F.linear(block.input_layernorm(x), weight[q_width:], None if bias is None else bias[q_width:])
            rows = kv.shape[0]
            k = rotate(kv[:, :kv_width].view(rows, self.kv_heads, self.head_dim), cos, sin).transpose(0, 1)
            v = kv[:, kv_width:].view(rows, self.kv_heads, self.head_dim).transpose(0, 1)
            if keep_kv is not None:  # the shared prefix: its frozen keys and values for the later blocks
                keep_kv[0].append(k)
                keep_kv[1].append(v)
                continue
            h = x[last] if h is None else h
            n = h.shape[0]
            qkv = self.qkv[index](block.input_layernorm(h))
            qk = rotate(qkv[:, :q_width + kv_width].view(n, self.heads + self.kv_heads, self.head_dim),
                         cos[last], sin[last])
            v_last = qkv[:, q_width + kv_width:].view(n, self.kv_heads, self.head_dim)
            outputs = []
            for i, (start, end, mask) in enumerate(zip(packing.starts, packing.ends, masks, strict=True)):
                keys = torch.cat([k[:, start:end - 1], qk[i, self.heads:, None]], dim=1)
                values = torch.cat([v[:, start:end - 1], v_last[i][:, None]], dim=1)
                if mask is not None and prefix is not None:
                    keys = torch.cat([prefix.keys[index], keys], dim=1)
                    values = torch.cat([prefix.values[index], values], dim=1)
                out = F.scaled_dot_product_attention(qk[i, :self.heads, None][None], keys[None], values[None],
                                                     enable_gqa=True)
                outputs.append(out[0].transpose(0, 1).reshape(-1, q_width))
            h = h + self.o[index](torch.cat(outputs))
            gate, up = self.gate_up[index](block.post_attention_layernorm(h)).chunk(2, dim=-1)
            h = h + self.down[index](block.mlp.act_fn(gate).mul_(up))
        if sums_only:
            return {}
        states = self.final_norm(h) if self.final_norm is not None else h
        return {self.depth: states.to(torch.float32)}


parser = argparse.ArgumentParser()
parser.add_argument("--data", required=True)
parser.add_argument("--exit-after", type=int, nargs="+", required=True)
parser.add_argument("--bootstrap", type=int, default=1000)
args = parser.parse_args()

settings = load_settings("config.yaml")
cfg = settings.scorer.model_copy(update={"layers": [15], "pooling": "last"})
configure_openmp(cfg)
extractor = FeatureExtractor(cfg)
data = load_dataset(args.data)
ids = [extractor.encoder.encode(c) for c in data.conversations()]
shipped, _ = probe_inputs(cfg, data, "none", progress=False)
model, grid = probe_model("none")
y1, y7 = data.labels("Qwen/Qwen2.5-Math-1.5B-Instruct"), data.labels("Qwen/Qwen2.5-Math-7B-Instruct")
rng = np.random.default_rng(0)
resamples = [rng.integers(0, len(y1), len(y1)) for _ in range(args.bootstrap)]


def context_exit_features(exit_after: int) -> np.ndarray:
    ContextExitDecoder.exit_after = exit_after
    decoder = ContextExitDecoder(extractor.model, layers=[15], pooling="last", final_norm=extractor.final_norm,
                                 prefix=extractor.encoder.shared_prefix())
    return np.concatenate([decoder.features(ids[i:i + 8]).numpy() for i in range(0, len(ids), 8)])


check = context_exit_features(14)[:64]
assert np.allclose(check, extractor.packed.features(ids[:64]).numpy(), atol=1e-3), "exit after 14 is the pass"
for exit_after in args.exit_after:
    x = context_exit_features(exit_after)
    for seed in (0, 1, 2):
        row: dict[str, object] = {"exit_after": exit_after, "seed": seed}
        for name, y in (("qwen2.5-math-1.5b", y1), ("qwen2.5-math-7b", y7)):
            p0 = held_out(shipped, [y1], y, cs=grid, model=model, seed=seed).probability
            p = held_out(x, [y1], y, cs=grid, model=model, seed=seed).probability
            diffs = [roc_auc_score(y[i], p[i]) - roc_auc_score(y[i], p0[i]) for i in resamples]
            row[name] = [round(roc_auc_score(y, p0), 4), round(roc_auc_score(y, p), 4),
                         round(roc_auc_score(y, p) - roc_auc_score(y, p0), 4),
                         [round(float(v), 4) for v in np.percentile(diffs, [2.5, 97.5])]]
        print(json.dumps(row), flush=True)
