"""The kernel comparison computes the same product through every kernel it times."""

from __future__ import annotations

import numpy as np
import torch

from research.perf.kernels import kernels


def test_every_kernel_computes_the_projection(tmp_path) -> None:
    generator = torch.Generator().manual_seed(0)
    x, w = torch.randn(40, 64, generator=generator), torch.randn(96, 64, generator=generator) / 8
    exact = (x.double() @ w.double().t()).numpy()
    found = kernels(x, w, 1, str(tmp_path))
    assert {"F.linear float32 (MKL)", "F.linear bf16 (oneDNN)", "oneDNN prepacked float32 (shipped)"} <= set(found)
    for name, fn in found.items():
        error = np.linalg.norm(fn() - exact) / np.linalg.norm(exact)
        tolerance = 1e-5 if "float32" in name or "f32" in name else 3e-2  # bf16 and int8 round
        assert error < tolerance, name
