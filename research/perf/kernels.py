"""The scorer's projections through other matrix-multiply kernels, at the packed pass's shapes, on this CPU.

``python -m research.perf.kernels [--rows 656] [--threads 2]`` times, for each projection of a SmolLM2-135M block
(q|k|v fused 576→960, o 576→576, gate|up fused 576→3,072, down 1,536→576) at ``rows`` tokens (8 GSM8K prompts
after the shared prefix), GFLOP/s of:

- ``F.linear`` in float32 (MKL) and bf16 (oneDNN; emulated where the CPU lacks AVX-512 bf16 and AMX);
- oneDNN on a weight it prepacked once (``router.scorer.packed.PrepackedLinear``, the pass's kernel), in float32
  and, where the CPU multiplies bf16 natively, in bf16;
- int8 through ``torch._int_mm`` (VNNI, AMX), activations quantised per call (``loadtest.scorer_passes``'s
  ``Int8Linear``, the int8 candidate the pass was measured with);
- ONNX Runtime's ``MatMul`` in float32, and dynamically quantised to int8 (``quantize_dynamic``: int8 weights,
  uint8 activations quantised per call);
- OpenVINO compiled for f32 and for bf16, and with int8 weights (``nncf.compress_weights``).

ONNX Runtime, OpenVINO and NNCF are not dependencies of the project: ``pip install onnxruntime openvino nncf``
into the venv first; a kernel whose package is missing is reported as such. It also prints each kernel's error
relative to the float32 product. Prints one JSON object; docs/benchmarks.md quotes it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from loadtest.scorer_passes import Int8Linear
from router.scorer import PrepackedLinear, cpu_flags, native_cpu_dtype

PROJECTIONS = {"qkv": (576, 960), "o": (576, 576), "gate_up": (576, 3072), "down": (1536, 576)}


def gflops(fn: Callable[[], Any], macs: int, seconds: float = 1.0) -> float:
    fn()
    fn()
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        fn()
        calls += 1
    return 2 * macs * calls / elapsed / 1e9


def _onnx_matmul(weight_t: np.ndarray) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    k, n = weight_t.shape
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "projection",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
                              [numpy_helper.from_array(weight_t, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def kernels(x: torch.Tensor, w: torch.Tensor, threads: int, tmp: str) -> dict[str, Callable[[], np.ndarray]]:
    """name → a call computing x wᵀ (float32 out), for every kernel whose package is installed."""
    out: dict[str, Callable[[], np.ndarray]] = {}
    xb, wb = x.to(torch.bfloat16), w.to(torch.bfloat16)
    out["F.linear float32 (MKL)"] = lambda: F.linear(x, w).numpy()
    out["F.linear bf16 (oneDNN)"] = lambda: F.linear(xb, wb).float().numpy()
    linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False).requires_grad_(False)
    linear.weight.copy_(w)
    prepacked = PrepackedLinear(linear)
    out["oneDNN prepacked float32 (shipped)"] = lambda: prepacked(x).numpy()
    if native_cpu_dtype() == "bfloat16":  # oneDNN cannot prepack bf16 for a CPU that emulates it
        linear_bf16 = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=torch.bfloat16).requires_grad_(False)
        linear_bf16.weight.copy_(wb)
        prepacked_bf16 = PrepackedLinear(linear_bf16)
        out["oneDNN prepacked bf16 (shipped where bf16 is native)"] = lambda: prepacked_bf16(xb).float().numpy()
    int8 = Int8Linear(linear)
    out["torch._int_mm int8, activations quantised per call"] = lambda: int8(x).numpy()
    xn = x.numpy()
    try:
        model = _onnx_matmul(w.t().contiguous().numpy())
    except ImportError:  # onnx: both runtimes below read the product as an ONNX graph
        return out
    try:
        import onnxruntime as ort
        from onnxruntime.quantization import QuantType, quantize_dynamic

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        fp32 = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        out["ONNX Runtime float32"] = lambda: fp32.run(None, {"x": xn})[0]
        src, dst = f"{tmp}/matmul.onnx", f"{tmp}/matmul-int8.onnx"
        with open(src, "wb") as f:
            f.write(model)
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
        int8 = ort.InferenceSession(dst, options, providers=["CPUExecutionProvider"])
        out["ONNX Runtime dynamic int8"] = lambda: int8.run(None, {"x": xn})[0]
    except ImportError:
        pass
    try:
        import openvino as ov

        core = ov.Core()
        for hint in ("f32", "bf16"):
            compiled = core.compile_model(core.read_model(model=model), "CPU", {
                "INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"})
            request = compiled.create_infer_request()
            out[f"OpenVINO {hint}"] = lambda r=request: r.infer({0: xn})[0]
        import nncf

        compressed = nncf.compress_weights(core.read_model(model=model), mode=nncf.CompressWeightsMode.INT8_SYM)
        compiled = core.compile_model(compressed, "CPU", {"INFERENCE_NUM_THREADS": threads,
                                                          "PERFORMANCE_HINT": "LATENCY"})
        request = compiled.create_infer_request()
        out["OpenVINO int8 weights (NNCF)"] = lambda r=request: r.infer({0: xn})[0]
    except ImportError:
        pass
    return out


def main() -> None:
    import tempfile

    parser = argparse.ArgumentParser(prog="python -m research.perf.kernels", description=__doc__)
    parser.add_argument("--rows", type=int, default=656)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    flags = cpu_flags()
    result: dict[str, Any] = {"rows": args.rows, "threads": args.threads,
                              "flags": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni",
                                                       "amx_bf16", "amx_int8"}),
                              "gflops": {}, "relative_error": {}}
    generator = torch.Generator().manual_seed(0)
    # NNCF logs and draws progress on stdout (bound when it is imported, inside): stdout is for the JSON
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode(), contextlib.redirect_stdout(sys.stderr):
        for name, (k, n) in PROJECTIONS.items():
            x = torch.randn(args.rows, k, generator=generator)
            w = torch.randn(n, k, generator=generator) / k ** 0.5
            exact = F.linear(x.double(), w.double()).numpy()
            for kernel, fn in kernels(x, w, args.threads, tmp).items():
                y = fn()
                result["relative_error"].setdefault(kernel, {})[name] = float(
                    f"{np.linalg.norm(y - exact) / np.linalg.norm(exact):.2e}")
                result["gflops"].setdefault(kernel, {})[name] = round(gflops(fn, args.rows * k * n), 1)
    macs = {name: k * n for name, (k, n) in PROJECTIONS.items()}
    for rates in result["gflops"].values():  # the block's rate: its FLOPs over the sum of its times
        rates["block"] = round(sum(macs.values()) / sum(macs[p] / r for p, r in rates.items()), 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
