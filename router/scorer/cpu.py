"""How the in-process scorer uses the CPU, settled before torch loads.

torch's CPU kernels run on OpenMP threads that wait for the next parallel region between operations. Spinning
on (``active``) starves whatever shares the cores: on cores shared with vLLM CPU servers (whose OpenMP threads
spin too) a 27 ms forward pass took 600 ms. Sleeping at once (``passive``) makes every operation of a pass pay
a thread wake-up, hundreds per pass. ``brief`` spins just long enough to bridge one pass's operations, then
sleeps. OpenMP reads these settings once, when the runtime loads, so this must run before the first
``import torch``.
"""

from __future__ import annotations

import logging
import os
import sys

from router.config import ScorerConfig

log = logging.getLogger(__name__)


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
