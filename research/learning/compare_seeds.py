"""Compare replay variants over several seeds: one row per (variant, seed) and the mean of each variant.

    python -m research.learning.compare_seeds DIR [DIR ...]

Each DIR is a replay's output folder named VARIANT-sSEED (e.g. /tmp/rx/both-s1); prints, from its report.json,
the learning arm's accuracy and cost per 1k, each backend's ECE and AUROC after the first 1,000 ratings, and on
the held-out rows the learner's final AUROC minus that of the probe fitted offline on the same ratings; and, where
the report has it, each backend's ECE on the questions it answered after those 1,000 ratings.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path


def row(report: dict) -> dict[str, float]:
    after = report["after_ratings"]
    total = report["learning"]["total"]
    static = report["static"]["total"]
    out = {"acc": total["accuracy"], "cost": total["cost_per_1k"], "acc_static": static["accuracy"],
           "cost_static": static["cost_per_1k"]}
    for b, held in report["offline_reference"]["backends"].items():
        short = b.split("-")[-1]
        out[f"ece_{short}"] = after["learning"]["ece"][b]
        out[f"auroc_{short}"] = after["learning"]["auroc"][b]
        out[f"gap_{short}"] = held["learner"]["auroc"] - held["offline"]["auroc"]
        served = after["learning"].get("served", {}).get(b)  # reports written before the served figures lack it
        if served is not None and served["ece"] is not None:
            out[f"served_ece_{short}"] = served["ece"]
    return out


def main(dirs: list[str]) -> None:
    groups: dict[str, list[dict[str, float]]] = defaultdict(list)
    cols: list[str] = []
    for d in dirs:
        r = row(json.loads((Path(d) / "report.json").read_text()))
        cols = list(r)
        variant = Path(d).name.rsplit("-s", 1)[0]
        groups[variant].append(r)
        print(f"{Path(d).name:24s} " + " ".join(f"{k}={v:.4f}" for k, v in r.items()))
    print()
    for variant, rows in groups.items():
        mean = {k: sum(r[k] for r in rows) / len(rows) for k in cols if all(k in r for r in rows)}
        print(f"{variant:24s} mean of {len(rows)}: " + " ".join(f"{k}={v:.4f}" for k, v in mean.items()))


if __name__ == "__main__":
    main(sys.argv[1:])
