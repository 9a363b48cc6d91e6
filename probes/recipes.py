"""Feature recipes (scorer layers × pooling) and choosing one by inner cross-validation.

One forward pass to the deepest layer gives every layer, so a sweep extracts the union of the candidates'
layers with ``last+mean`` pooling once (through the gateway's feature function) and slices columns out of it:
the columns of ``layers=L, pooling=P`` are exactly what a scorer configured that way computes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

POOLINGS = ("last", "mean", "last+mean")


@dataclass(frozen=True)
class Recipe:
    layers: tuple[int, ...]
    pooling: str

    def __str__(self) -> str:
        return f"layers={list(self.layers)} pooling={self.pooling}"

    def as_dict(self) -> dict[str, object]:
        return {"layers": list(self.layers), "pooling": self.pooling}


def parse_recipes(layer_groups: Sequence[str], poolings: Sequence[str]) -> list[Recipe]:
    """``["15", "12+18"]`` × ``["last", "mean"]`` → four recipes (a group joins layers with '+')."""
    out = []
    for group in layer_groups:
        layers = tuple(sorted({int(v) for v in group.split("+")}))
        for pooling in poolings:
            if pooling not in POOLINGS:
                raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, not {pooling!r}")
            out.append(Recipe(layers, pooling))
    return out


def columns(recipe: Recipe, source_layers: Sequence[int], source_pooling: str, hidden: int) -> np.ndarray:
    """Column indices of ``recipe``'s features inside features made with ``source_layers``/``source_pooling``."""
    kinds = {"last": ["last"], "mean": ["mean"], "last+mean": ["last", "mean"]}
    have = kinds[source_pooling]
    per_layer = len(have)
    idx = []
    for layer in recipe.layers:
        if layer not in source_layers:
            raise ValueError(f"layer {layer} was not extracted")
        pos = list(source_layers).index(layer)
        for kind in kinds[recipe.pooling]:
            if kind not in have:
                raise ValueError(f"pooling {kind} was not extracted")
            start = (pos * per_layer + have.index(kind)) * hidden
            idx.append(np.arange(start, start + hidden))
    return np.concatenate(idx)
