"""What Python's garbage collector costs a process that holds the scorer, with and without ``gc.freeze()``.

Loads what ``python -m router serve`` loads (the scorer model, the probes, the app) in its own process, then
times full collections (``gc.collect()``, the median of a few) before and after freezing. Prints one JSON
object. ``python -m loadtest.gc_cost --config CFG``.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

from router import create_app, load_probe_groups, load_settings


def full_collection_s(repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        gc.collect()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.gc_cost", description=__doc__)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    settings = load_settings(args.config)
    create_app(settings, load_probe_groups(settings))
    gc.collect()
    tracked = len(gc.get_objects())
    before = full_collection_s(args.repeats)
    gc.freeze()
    after = full_collection_s(args.repeats)
    print(json.dumps({"tracked_objects": tracked, "full_collection_ms": round(before * 1e3, 1),
                      "full_collection_us_frozen": round(after * 1e6, 1)}))


if __name__ == "__main__":
    main()
