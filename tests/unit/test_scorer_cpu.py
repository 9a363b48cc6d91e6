"""The scorer's use of the CPU: a model loaded off the calling thread leaves no OpenMP team behind, and
``dtype: auto`` computes in bfloat16 only where the CPU multiplies it natively."""

from __future__ import annotations

import subprocess
import sys

import pytest

from router.config import ScorerConfig
from router.scorer.cpu import call_in_own_thread, compute_dtype, cpu_flags, native_cpu_dtype

# Runs a parallel torch operation (a team of 3: its caller and 2 workers) on threads of their own, then on the
# main thread, and prints the process's OS thread count after each, once the count has settled (a team's workers
# end shortly after their master). The first call also starts threads torch keeps for the process.
SCRIPT = """
import os, time, torch
from router.scorer.cpu import call_in_own_thread
def threads():
    counts = []
    for _ in range(100):
        counts.append(len(os.listdir('/proc/self/task')))
        if len(counts) >= 5 and len(set(counts[-5:])) == 1:
            break
        time.sleep(0.02)
    return counts[-1]
def parallel_work():
    torch.set_num_threads(3)
    return float(torch.ones(1 << 22).exp().sum())
call_in_own_thread(parallel_work)
first = threads()
call_in_own_thread(parallel_work)
second = threads()
parallel_work()
print(first, second, threads())
"""


def test_a_team_started_on_its_own_thread_ends_with_it() -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, check=True)
    first, second, after_main = map(int, out.stdout.split())
    assert second == first  # each call's team went with its thread
    assert after_main == first + 2  # the control: the main thread's team stays, two workers besides it


def test_call_in_own_thread_returns_and_raises_what_the_call_does() -> None:
    assert call_in_own_thread(lambda: 42) == 42
    with pytest.raises(ZeroDivisionError):
        call_in_own_thread(lambda: 1 / 0)


CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
flags\t\t: fpu sse2 avx2 fma {extra}
bogomips\t: 4800.00
"""


@pytest.mark.parametrize(("extra", "expected"), [
    ("", "float32"),                              # AVX2 only: torch emulates bf16, several times slower
    ("avx512f avx512_vnni", "float32"),           # AVX-512 without its bf16 extension
    ("avx512f avx512_bf16", "bfloat16"),
    ("amx_tile amx_bf16 amx_int8", "bfloat16"),
])
def test_auto_dtype_is_bfloat16_only_where_the_cpu_multiplies_it_natively(extra: str, expected: str) -> None:
    flags = cpu_flags(CPUINFO.format(extra=extra))
    assert "avx2" in flags
    assert compute_dtype(ScorerConfig(), flags) == expected
    assert native_cpu_dtype(flags) == expected


def test_an_explicit_dtype_or_a_gpu_decides_without_the_cpu() -> None:
    avx2 = cpu_flags(CPUINFO.format(extra=""))
    assert compute_dtype(ScorerConfig(dtype="bfloat16"), avx2) == "bfloat16"
    assert compute_dtype(ScorerConfig(dtype="float16"), avx2) == "float16"
    assert compute_dtype(ScorerConfig(device="cuda"), avx2) == "bfloat16"
    assert cpu_flags("processor\t: 0\n") == frozenset()  # no flags line (another OS's text): float32
    assert compute_dtype(ScorerConfig(), frozenset()) == "float32"
