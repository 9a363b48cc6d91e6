"""How the in-process scorer uses the CPU, settled before torch loads.

torch's CPU kernels run on OpenMP threads that wait for the next parallel region between operations. Spinning
on (``active``) starves whatever shares the cores: on cores shared with vLLM CPU servers (whose OpenMP threads
spin too) a 27 ms forward pass took 600 ms. Sleeping at once (``passive``) makes every operation of a pass pay
a thread wake-up, hundreds per pass. ``brief`` spins just long enough to bridge one pass's operations, then
sleeps. OpenMP reads these settings once, when the runtime loads, so this must run before the first
``import torch``.

Spinning also needs the scorer's worker to be the process's only OpenMP master. GNU OpenMP keeps a team of
threads for every thread that has run a parallel region, for as long as that thread lives, and once it manages
more threads than there are cores it stops spinning altogether (every operation then pays a wake-up). Loading
the model runs parallel regions, so the local scorer loads it on a thread of its own (``call_in_own_thread``)
whose team goes when the thread ends, not on the event loop's thread, whose team would outlive the load: on
2 cores a lone routed request's scoring went from 1.45× the pass to 1.02× (research/perf/README.md). torch's
thread count (``scorer.threads``) is process-wide, so the worker still gets it.

The dtype: bfloat16 halves the bytes and, where the CPU multiplies it natively (AVX-512 bf16, AMX), runs the pass
about 1.7× faster than float32; where it does not (AVX2 only), torch emulates it, and the same pass was 6.5×
slower than float32 (research/perf/README.md). ``scorer.dtype: auto`` picks by the CPU's flags.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from router.config import ScorerConfig

T = TypeVar("T")

log = logging.getLogger(__name__)


# CPU flags of a native bf16 matrix product: AVX-512 BF16 (dot products) and AMX (tiles)
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU's feature flags, from /proc/cpuinfo (or the given text); empty where there is none (not Linux)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def compute_dtype(cfg: ScorerConfig, flags: frozenset[str] | None = None) -> str:
    """The dtype the scorer's pass runs in: the configured one, or for ``auto`` bfloat16 where the hardware
    multiplies it natively (any non-CPU device; a CPU with ``NATIVE_BF16_FLAGS``) and float32 otherwise."""
    if cfg.dtype != "auto":
        return cfg.dtype
    return native_cpu_dtype(flags) if cfg.device == "cpu" else "bfloat16"


def native_cpu_dtype(flags: frozenset[str] | None = None) -> str:
    """bfloat16 where this CPU (or one with ``flags``) multiplies it natively, float32 where it would be emulated."""
    return "bfloat16" if NATIVE_BF16_FLAGS & (cpu_flags() if flags is None else flags) else "float32"


# 'brief': the spin count of GNU OpenMP (torch's CPU wheels: roughly a tenth of a millisecond) and the block
# time of Intel's (in ms, its shortest)
BRIEF_WAIT = {"GOMP_SPINCOUNT": "100000", "KMP_BLOCKTIME": "1"}


def openmp_environment(policy: str) -> dict[str, str | None]:
    """The environment variables a wait policy sets (None: removed)."""
    if policy == "brief":
        return {"OMP_WAIT_POLICY": None, **BRIEF_WAIT}
    return {"OMP_WAIT_POLICY": policy.upper(), **dict.fromkeys(BRIEF_WAIT)}


def configure_openmp(cfg: ScorerConfig) -> None:
    """Set the OpenMP wait policy the config asks for, for this process and its children."""
    wanted = openmp_environment(cfg.omp_wait_policy)
    if "torch" in sys.modules and any(os.environ.get(k) != v for k, v in wanted.items()):
        log.warning("torch is already loaded: the OpenMP wait policy %r takes effect only in new processes",
                    cfg.omp_wait_policy)
    for key, value in wanted.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def call_in_own_thread(fn: Callable[[], T]) -> T:
    """``fn()`` on a new thread that ends with it, so whatever OpenMP team it starts ends too."""
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as e:  # re-raised in the caller
            error.append(e)

    thread = threading.Thread(target=run, name="scorer-load")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]
