"""Research screen (not part of the package): fewer FLOPs by dropping the scorer's least-used MLP neurons
(issue 14; 2026-12-06).

Three quarters of a SmolLM2-135M block's matrix work is its MLP (576 → 2 × 1536 → 576, against 576 → 960 and
576 → 576 for attention), so keeping a share of each block's 1,536 intermediate neurons cuts the pass's FLOPs by up to
three quarters of that share's complement without touching its depth. A neuron's importance is the mean
|act(gate)·up| it contributes on calibration prompts (by default GSM8K's training questions: prompts only, no
labels, none of them in the test file) times the norm of its column of the down projection; each block keeps
its most important ``KEEP`` share, and the sliced weights run through the gateway's own packed pass (so the
prompts/s printed are the pass's real speed at that width, measured here, one variant after another).

Usage, from the repository root:
    .venv/bin/python research/probes/mlp_pruning.py DATA.jsonl OUT.npy [--calibration CAL.jsonl]
        [--keep 1,0.75,0.5,0.35] [--calibration-prompts 512]
    .venv/bin/python research/probes/token_pooling.py paired --data DATA.jsonl --features OUT.npy \
        --recipe k100=last_k100:none --recipe k50=last_k50:none ...

Writes each variant's block-15 last-token column (``last_k<percent>``; names in OUT.json, as ``token_pooling.py``
reads them) and prints each variant's MLP width, FLOPs a token against the full blocks, and prompts/s.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from probes import load_dataset
from router import load_settings
from router.scorer import FeatureExtractor, PackedDecoder, configure_openmp


@torch.inference_mode()
def importance(fx: FeatureExtractor, prompts: list[list[int]]) -> list[torch.Tensor]:
    """Per block, each intermediate neuron's mean |act(gate)·up| over the prompts' tokens × |down column|."""
    blocks = fx.model.layers
    sums = [torch.zeros(b.mlp.down_proj.in_features, dtype=torch.float64) for b in blocks]
    tokens = 0

    def recorder(i: int):
        def hook(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            sums[i].add_(args[0].abs().to(torch.float64).sum(dim=(0, 1)))
        return hook

    handles = [b.mlp.down_proj.register_forward_pre_hook(recorder(i)) for i, b in enumerate(blocks)]
    try:
        for ids in prompts:  # one prompt a pass: no padding rows in the sums
            fx.padded_features([ids])
            tokens += len(ids)
    finally:
        for h in handles:
            h.remove()
    return [(s / tokens).to(torch.float32) * b.mlp.down_proj.weight.detach().float().norm(dim=0)
            for s, b in zip(sums, blocks, strict=True)]


def slice_mlps(fx: FeatureExtractor, full: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
               scores: list[torch.Tensor], keep: float) -> int:
    """Give every block its ``keep`` share of neurons (by score) and rebuild the packed pass; returns the width."""
    width = 0
    for block, (gate, up, down), score in zip(fx.model.layers, full, scores, strict=True):
        width = max(1, round(keep * gate.shape[0]))
        kept = torch.sort(torch.topk(score, width).indices).values
        mlp = block.mlp
        mlp.gate_proj.weight = torch.nn.Parameter(gate[kept].clone(), requires_grad=False)
        mlp.up_proj.weight = torch.nn.Parameter(up[kept].clone(), requires_grad=False)
        mlp.down_proj.weight = torch.nn.Parameter(down[:, kept].clone(), requires_grad=False)
        mlp.gate_proj.out_features = mlp.up_proj.out_features = mlp.down_proj.in_features = width
    fx.packed = PackedDecoder(fx.model, layers=fx.cfg.layers, pooling=fx.cfg.pooling, final_norm=fx.final_norm,
                              prefix=fx.encoder.shared_prefix())
    return width


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("data")
    p.add_argument("out")
    p.add_argument("--calibration", default="../shared/data/gsm8k_train_qwen25math.jsonl")
    p.add_argument("--calibration-prompts", type=int, default=512)
    p.add_argument("--keep", default="1,0.75,0.5,0.35")
    args = p.parse_args()
    settings = load_settings("config.yaml")
    configure_openmp(settings.scorer)
    fx = FeatureExtractor(settings.scorer)
    assert fx.packed is not None and fx.cfg.pooling == "last" and fx.cfg.layers == [15]
    calibration = load_dataset(args.calibration)
    cal_ids = [fx.encoder.encode(c) for c in calibration.conversations()[:args.calibration_prompts]]
    start = time.time()
    scores = importance(fx, cal_ids)
    print(json.dumps({"calibration_prompts": len(cal_ids), "s": round(time.time() - start)}), flush=True)
    full = [(b.mlp.gate_proj.weight.detach().clone(), b.mlp.up_proj.weight.detach().clone(),
             b.mlp.down_proj.weight.detach().clone()) for b in fx.model.layers]
    data = load_dataset(args.data)
    ids = [fx.encoder.encode(c) for c in data.conversations()]
    order = np.argsort([len(i) for i in ids], kind="stable")
    hidden = fx.info.hidden_size
    attn = hidden * (fx.model.config.num_attention_heads + 2 * fx.model.config.num_key_value_heads) \
        * fx.model.config.head_dim + hidden * hidden
    keeps = [float(k) for k in args.keep.split(",")]
    names = [f"last_k{round(100 * k)}" for k in keeps]
    x = np.zeros((len(ids), hidden * len(keeps)), dtype=np.float32)
    stats = {}
    for n, (name, keep) in enumerate(zip(names, keeps, strict=True)):
        width = slice_mlps(fx, full, scores, keep)
        fx.features_from_ids([ids[r] for r in order[:8]])  # warm-up
        start = time.time()
        for first in range(0, len(order), 8):
            rows = order[first:first + 8]
            x[rows, n * hidden:(n + 1) * hidden] = fx.features_from_ids([ids[r] for r in rows])
        seconds = time.time() - start
        stats[name] = {"mlp_width": width, "flops_vs_full": round((attn + 3 * hidden * width)
                                                                  / (attn + 3 * hidden * full[0][0].shape[0]), 3),
                       "prompts_per_s": round(len(ids) / seconds, 1)}
        print(json.dumps({"variant": name} | stats[name]), flush=True)
    np.save(args.out, x)
    Path(args.out.removesuffix(".npy") + ".json").write_text(json.dumps({"names": names, "width": hidden,
                                                                         "stats": stats}))


if __name__ == "__main__":
    main()
