"""What each way of running the scorer's forward pass buys, side by side in one process, on the same prompts.

``python -m loadtest.scorer_passes [--config config.yaml] [--prompts 64] [--rounds 3]`` measures, in interleaved
rounds (the median round counts), prompts per second of:

- transformers' padded pass at batch 1 and batch 8 (the reference of the benchmark's ratio);
- the packed pass without the shared prefix, then with it (the shipped pass), at batch 8 and 16;
- the shipped pass on batches it has not met before (drawn anew for every call), with its packed rows rounded
  (``router.scorer.packed.padded_rows``) and without: every other variant repeats the same batches;
- the shipped pass with one torch thread instead of all, and two such passes side by side on two worker threads
  (``scorer.workers: 2``), each on its own batches; and (in float32, where its projections run on weights
  oneDNN prepacked at load) with ``F.linear`` on the plain weights instead;
- the packed pass of shallower recipes (``--fewer-blocks``, default layer 6 and layer 8 with last+mean pooling):
  what reading an earlier block would buy, measured and not taken (docs/benchmarks.md gives their AUROC);
- the shipped pass with its element-wise work fused by ``torch.compile`` (``--no-compiled`` to skip; inductor
  needs a C++ compiler): measured, not taken (docs/benchmarks.md says why);
- int8 projections (weights per output channel, activations per token, ``torch._int_mm``) over the packed pass:
  the candidate that was measured and dropped; it also prints how far its features and the shipped probes'
  estimates move from the float32 reference.

Prints one JSON object. The figures in docs/benchmarks.md ("The scorer's forward pass") come from it.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from loadtest.prompts import questions
from router import load_probe, load_settings
from router.scorer import FeatureExtractor, PrepackedLinear

Features = Callable[[Sequence[Sequence[int]]], Any]

FRESH = "shipped, batch 8, batches not seen before, "  # variants timed on batches drawn anew (``rate``)
WORKERS = "shipped, batch 8, two workers of one torch thread"  # timed by ``rate_in_workers``


def rate(features: Features, ids: list[list[int]], batch: int, shuffle: random.Random | None = None) -> float:
    """Prompts a second over ``ids`` in batches; with ``shuffle``, in batches drawn anew for every call, whose
    packed row counts the pass has mostly not met before (as in live traffic)."""
    if shuffle is not None:
        ids = shuffle.sample(ids, len(ids))
    batches = [ids[i:i + batch] for i in range(0, len(ids) - batch + 1, batch)]
    features(batches[0])
    start = time.perf_counter()
    for b in batches:
        features(b)
    return sum(map(len, batches)) / (time.perf_counter() - start)


class Int8Linear(torch.nn.Module):
    """y = x Wᵀ + b with int8 weights (symmetric, per output channel) and int8 activations (symmetric, per token),
    multiplied by ``torch._int_mm`` (AVX-512 VNNI here; AMX where a CPU has it)."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        self.scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127
        self.weight = torch.round(w / self.scale[:, None]).clamp(-127, 127).to(torch.int8).t()
        self.bias = linear.bias.detach().float() if linear.bias is not None else None
        self.dtype = linear.weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).float()
        x_scale = flat.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127
        q = torch.round(flat / x_scale).clamp(-127, 127).to(torch.int8)
        y = torch._int_mm(q, self.weight).float() * (x_scale * self.scale)
        if self.bias is not None:
            y = y + self.bias
        return y.to(self.dtype).reshape(*x.shape[:-1], -1)


def rate_in_workers(features: Features, ids: list[list[int]], batch: int, workers: int) -> float:
    """Prompts a second over ``ids`` in batches taken in turn by ``workers`` threads of one torch thread each, as
    the local scorer's batcher runs them with ``scorer.workers`` (each warms up on its own thread first)."""
    batches = [ids[i:i + batch] for i in range(0, len(ids) - batch + 1, batch)]
    todo = iter(batches)  # next() on a shared iterator: each batch to exactly one worker (GIL-atomic)
    ready = threading.Barrier(workers + 1)
    finished: list[float] = []

    def work() -> None:
        torch.set_num_threads(1)
        features(batches[0])
        ready.wait()
        for b in todo:
            features(b)
        finished.append(time.perf_counter())

    threads = [threading.Thread(target=work) for _ in range(workers)]
    for thread in threads:
        thread.start()
    ready.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    return sum(map(len, batches)) / (max(finished) - start)


def quantise(extractor: FeatureExtractor) -> None:
    """Every projection of the extractor's packed pass in int8 (its own copy of the model)."""
    decoder = extractor.packed
    assert decoder is not None
    decoder.qkv = [Int8Linear(lin) for lin in decoder.qkv]
    decoder.gate_up = [Int8Linear(lin) for lin in decoder.gate_up]
    decoder.o = [Int8Linear(block.self_attn.o_proj) for block in decoder.blocks]
    decoder.down = [Int8Linear(block.mlp.down_proj) for block in decoder.blocks]
    if decoder.prefix is not None:
        decoder.prefix = decoder.prefix_state(decoder.prefix.ids)


def unpack(extractor: FeatureExtractor) -> bool:
    """The packed pass's projections through ``F.linear`` on the plain weights instead of oneDNN's prepacked
    ones (what the pass did before ``PrepackedLinear``); False where they were not prepacked."""
    decoder = extractor.packed
    assert decoder is not None
    if not isinstance(decoder.qkv[0], PrepackedLinear):
        return False
    for name in ("qkv", "gate_up", "o", "down"):
        setattr(decoder, name, [partial(F.linear, weight=p.weight, bias=p.bias) for p in getattr(decoder, name)])
    return True


def compile_elementwise(extractor: FeatureExtractor, ids: list[list[int]]) -> float:
    """The packed pass with its element-wise work (norms, rotary embedding, activation, residuals) fused by
    ``torch.compile`` (inductor's C++ kernels): each block's attention inputs and its residual + MLP compiled
    for any number of rows, the projections through ``F.linear`` on the plain weights (oneDNN's prepacked op
    cannot be traced), attention left as it is. Returns the seconds compiling took (on ``ids``)."""
    unpack(extractor)
    decoder = extractor.packed
    assert decoder is not None
    torch._dynamo.config.recompile_limit = 4 * len(decoder.blocks)  # a graph per block: its index is a constant
    decoder._attention_inputs = torch.compile(decoder._attention_inputs, dynamic=True)  # type: ignore[method-assign]
    decoder._residual_and_mlp = torch.compile(decoder._residual_and_mlp, dynamic=True)  # type: ignore[method-assign]
    start = time.perf_counter()
    for size in (8, 3, 1):  # every block, several row counts
        extractor.features_from_ids(ids[:size])
    return time.perf_counter() - start


def deviation(config: Path, features: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """How far features move from the float32 reference: cosine, and the shipped probes' estimates."""
    cos = (features * reference).sum(1) / np.linalg.norm(features, axis=1) / np.linalg.norm(reference, axis=1)
    settings = load_settings(config)
    moves = [np.abs(load_probe(b.probe).predict(features) - load_probe(b.probe).predict(reference))
             for b in settings.backends if b.probe is not None]
    return {"min_cosine": round(float(cos.min()), 5), "max_p_change": round(float(max(m.max() for m in moves)), 4),
            "mean_p_change": round(float(np.mean([m.mean() for m in moves])), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.scorer_passes", description=__doc__)
    parser.add_argument("--config", type=Path, default=Path("config.yaml"))
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compiled", action=argparse.BooleanOptionalAction, default=True,
                        help="also the pass with torch.compile's fused element-wise kernels (needs a C++ compiler)")
    parser.add_argument("--fewer-blocks", default="6:last+mean,8:last+mean", help="LAYER:POOLING,... ('' for none)")
    args = parser.parse_args()
    cfg = load_settings(args.config).scorer
    shipped = FeatureExtractor(cfg)
    no_prefix = FeatureExtractor(cfg)
    assert no_prefix.packed is not None
    no_prefix.packed.prefix = None
    int8 = FeatureExtractor(cfg)
    quantise(int8)
    unpacked = FeatureExtractor(cfg)
    prepacked = unpack(unpacked)
    all_threads = torch.get_num_threads()
    ids = [shipped.encoder.encode([{"role": "user", "content": q}]) for q in questions(args.prompts)]
    compiled = FeatureExtractor(cfg) if args.compiled else None
    compile_s = compile_elementwise(compiled, ids) if compiled is not None else None
    unrounded = FeatureExtractor(cfg)
    assert unrounded.packed is not None
    unrounded.packed.round_rows = False
    variants: dict[str, tuple[Features, int, int]] = {
        "transformers padded, batch 1": (shipped.padded_features, 1, all_threads),
        "transformers padded, batch 8": (shipped.padded_features, 8, all_threads),
        "packed, no shared prefix, batch 8": (no_prefix.features_from_ids, 8, all_threads),
        "packed + shared prefix (shipped), batch 1": (shipped.features_from_ids, 1, all_threads),
        "packed + shared prefix (shipped), batch 8": (shipped.features_from_ids, 8, all_threads),
        "packed + shared prefix (shipped), batch 16": (shipped.features_from_ids, 16, all_threads),
        "shipped, batch 8, one torch thread": (shipped.features_from_ids, 8, 1),
        WORKERS: (shipped.features_from_ids, 8, 1),
        FRESH + "rows rounded (shipped)": (shipped.features_from_ids, 8, all_threads),
        FRESH + "rows not rounded": (unrounded.features_from_ids, 8, all_threads),
        "shipped + int8 projections, batch 8": (int8.features_from_ids, 8, all_threads),
    }
    if prepacked:
        variants["shipped, weights not prepacked, batch 8"] = (unpacked.features_from_ids, 8, all_threads)
    if compiled is not None:
        variants["shipped, element-wise fused by torch.compile, batch 8"] = (compiled.features_from_ids, 8,
                                                                             all_threads)
    for spec in filter(None, args.fewer_blocks.split(",")):
        layer, pooling = spec.split(":")
        shallow = FeatureExtractor(cfg.model_copy(update={"layers": [int(layer)], "pooling": pooling}))
        variants[f"packed, layer {layer} {pooling}, batch 8"] = (shallow.features_from_ids, 8, all_threads)
    rounds: dict[str, list[float]] = {name: [] for name in variants}
    shuffle = random.Random(0)
    for r in range(args.rounds):
        names = list(variants)
        names = names[r % len(names):] + names[:r % len(names)]
        for name in names:
            features, batch, threads = variants[name]
            torch.set_num_threads(threads)
            if name == WORKERS:
                rounds[name].append(rate_in_workers(features, ids, batch, 2))
            else:
                rounds[name].append(rate(features, ids, batch, shuffle if name.startswith(FRESH) else None))
        torch.set_num_threads(all_threads)
    reference = FeatureExtractor(cfg.model_copy(update={"dtype": "float32"})).padded_features(ids)
    result = {
        "threads": all_threads, "dtype": shipped.dtype, "layers": list(cfg.layers), "prompts": len(ids),
        "prompts_per_s": {name: round(statistics.median(r), 1) for name, r in rounds.items()},
        "rounds": {name: [round(x, 1) for x in r] for name, r in rounds.items()},
        "vs_float32": {
            f"shipped ({shipped.dtype})": deviation(args.config, shipped.features_from_ids(ids), reference),
            f"transformers padded ({shipped.dtype})": deviation(args.config, shipped.padded_features(ids), reference),
            "int8 projections": deviation(args.config, int8.features_from_ids(ids), reference),
        },
    }
    if compiled is not None:
        result["compile_s"] = round(compile_s, 1)
        result["vs_float32"]["element-wise fused by torch.compile"] = deviation(
            args.config, compiled.features_from_ids(ids), reference)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
