"""The scorer's use of OpenMP: a model loaded off the calling thread leaves no OpenMP team behind."""

from __future__ import annotations

import subprocess
import sys

import pytest

from router.scorer.cpu import call_in_own_thread

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
