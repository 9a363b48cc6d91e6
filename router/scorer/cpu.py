"""How the in-process scorer uses the CPU, settled before torch loads.

torch's CPU kernels run on OpenMP threads that, by default, spin for a while after each parallel region
waiting for more work. On cores the scorer has to itself that saves a little latency; on cores shared with the
event loop or with vLLM CPU servers (whose OpenMP threads spin too), spinning threads starve each other and a
27 ms forward pass takes 600 ms. OpenMP reads its wait policy once, when the runtime loads, so this must run
before the first ``import torch``.
"""

from __future__ import annotations

import logging
import os
import sys

from router.config import ScorerConfig

log = logging.getLogger(__name__)


def configure_openmp(cfg: ScorerConfig) -> None:
    """Set the OpenMP wait policy the config asks for (OMP_WAIT_POLICY), for this process and its children."""
    wanted = cfg.omp_wait_policy.upper()
    if "torch" in sys.modules and os.environ.get("OMP_WAIT_POLICY", "").upper() != wanted:
        log.warning("torch is already loaded: OMP_WAIT_POLICY=%s takes effect only in new processes", wanted)
    os.environ["OMP_WAIT_POLICY"] = wanted
