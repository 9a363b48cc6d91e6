"""How close the scorer's forward pass runs to this machine's limit: FLOPs from the model's shapes and the real
token counts, against the matrix-multiply rate measured here at the same shapes and dtype.

Executed FLOPs count what a pass computes: the packed pass runs each prompt's tokens after the shared prefix and,
with ``last`` pooling, the deepest block's attention output and MLP at the last token only; transformers' padded
pass runs every row of the batch to its longest prompt. Attention's score and value products are counted too
(they are small beside the projections at these lengths).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from router.scorer import FeatureExtractor, PrepackedLinear


class Shapes:
    def __init__(self, extractor: FeatureExtractor) -> None:
        cfg = extractor.model.config
        self.hidden, self.inter = cfg.hidden_size, cfg.intermediate_size
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.depth = max(extractor.cfg.layers)
        # (input width, output width) of each projection of a block: q|k|v fused, o, gate|up fused, down
        self.projections = ((self.hidden, (self.heads + 2 * self.kv_heads) * self.head_dim),
                            (self.heads * self.head_dim, self.hidden), (self.hidden, 2 * self.inter),
                            (self.inter, self.hidden))

    def block_macs(self, rows: int) -> int:
        return rows * sum(k * n for k, n in self.projections)

    def attention_macs(self, queries: int, context_end: int) -> int:
        """Scores and values for ``queries`` consecutive query positions ending at ``context_end`` keys."""
        keys = sum(context_end - i for i in range(queries))
        return 2 * self.heads * self.head_dim * keys


def packed_flops(shapes: Shapes, ids: Sequence[Sequence[int]], prefix: int, last_only: bool) -> float:
    macs = 0
    for prompt in ids:
        shared = prefix if prefix and len(prompt) > prefix else 0
        n, end = len(prompt) - shared, len(prompt)
        full_blocks = shapes.depth - 1 if last_only else shapes.depth
        macs += full_blocks * (shapes.block_macs(n) + shapes.attention_macs(n, end))
        if last_only:
            kv_width = 2 * shapes.kv_heads * shapes.head_dim
            q_width = shapes.heads * shapes.head_dim
            macs += (n * shapes.hidden * kv_width + shapes.hidden * q_width + shapes.attention_macs(1, end)
                     + sum(k * w for k, w in shapes.projections[1:]))
    return 2.0 * macs


def padded_flops(shapes: Shapes, batches: Sequence[Sequence[Sequence[int]]]) -> float:
    macs = 0
    for batch in batches:
        width = max(len(p) for p in batch)
        macs += len(batch) * shapes.depth * (shapes.block_macs(width) + shapes.attention_macs(width, width))
    return 2.0 * macs


def matmul_gflops(shapes: Shapes, rows: int, dtype: torch.dtype, prepacked: bool = False,
                  repeats: int = 20) -> float:
    """This machine's rate for the blocks' projections at ``rows`` tokens (torch's threads, ``dtype``), through
    ``F.linear`` (transformers' kernel) or, with ``prepacked``, the packed pass's ``PrepackedLinear``."""
    linears = []
    for k, n in shapes.projections:
        linear = torch.nn.Linear(k, n, bias=False, dtype=dtype).requires_grad_(False)
        linears.append(PrepackedLinear(linear) if prepacked else (lambda x, w=linear.weight: F.linear(x, w)))
    inputs = [torch.randn(rows, k, dtype=dtype) for k, _ in shapes.projections]
    for x, linear in zip(inputs, linears, strict=True):
        linear(x)
    start = time.perf_counter()
    for _ in range(repeats):
        for x, linear in zip(inputs, linears, strict=True):
            linear(x)
    elapsed = time.perf_counter() - start
    return 2.0 * repeats * shapes.block_macs(rows) / elapsed / 1e9


def roofline(extractor: FeatureExtractor, reference: FeatureExtractor, ids: Sequence[Sequence[int]], batch: int,
             scorer_ms_per_prompt: float, transformers_ms_per_prompt: float, reference_threads: int) -> dict[str, Any]:
    """The scorer's pass against the matmul rate with torch's current threads; transformers' padded pass through
    ``reference``'s blocks against the rate with ``reference_threads``."""
    shapes = Shapes(extractor)
    packed = extractor.packed
    prefix = len(packed.prefix.ids) if packed is not None and packed.prefix is not None else 0
    last_only = packed is not None and extractor.cfg.pooling == "last"
    batches = [ids[i:i + batch] for i in range(0, len(ids) - batch + 1, batch)]
    prompts = sum(len(b) for b in batches)
    flat = [p for b in batches for p in b]
    scorer = (packed_flops(shapes, flat, prefix, last_only) if packed is not None
              else padded_flops(shapes, batches)) / prompts
    reference_flops = padded_flops(Shapes(reference), batches) / prompts
    rows = round(sum(len(p) - (prefix if len(p) > prefix else 0) for p in flat) / len(batches))
    dtype = getattr(torch, extractor.dtype)
    prepacked = packed is not None and isinstance(packed.qkv[0], PrepackedLinear)
    limit = matmul_gflops(shapes, rows, dtype, prepacked=prepacked)
    threads = torch.get_num_threads()
    torch.set_num_threads(reference_threads)
    padded_rows = round(sum(len(b) * max(map(len, b)) for b in batches) / len(batches))
    reference_limit = matmul_gflops(shapes, padded_rows, dtype)
    torch.set_num_threads(threads)
    scorer_rate = scorer / (scorer_ms_per_prompt / 1000) / 1e9
    reference_rate = reference_flops / (transformers_ms_per_prompt / 1000) / 1e9
    return {"gflop_per_prompt": round(scorer / 1e9, 3),
            "transformers_gflop_per_prompt": round(reference_flops / 1e9, 3),
            "prefix_tokens": prefix, "mean_prompt_tokens": round(sum(map(len, flat)) / prompts, 1),
            "threads": threads, "matmul_rows": rows, "matmul_gflops": round(limit, 1), "matmul_prepacked": prepacked,
            "scorer_gflops": round(scorer_rate, 1), "scorer_vs_limit": round(scorer_rate / limit, 3),
            "reference_threads": reference_threads, "transformers_matmul_rows": padded_rows,
            "transformers_matmul_gflops": round(reference_limit, 1), "transformers_gflops": round(reference_rate, 1),
            "transformers_vs_limit": round(reference_rate / reference_limit, 3)}
