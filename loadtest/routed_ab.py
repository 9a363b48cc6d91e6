"""The routed path of gateways that differ only in their environment, side by side in interleaved rounds.

``python -m loadtest.routed_ab --variant NAME[=CONFIG][:VAR=VALUE,...] ... [--rounds 3] [--data FILE] [--prompts
64]`` starts the fake backend and one gateway per variant (the scorer, probes and policy of CONFIG, ``config.yaml``
by default, every backend on the fake one; every variable a ``ROUTER_…`` override), then, round by round with the
order rotating, loads each with routed requests (``--prompts`` questions of ``--data``, a JSONL file with a
"question" field, GSM8K test by default): 40 at c=1 (median latency) and 192 at c=16 (requests a second, and the
scorer's mean batch from the gateway's /metrics). Only one gateway is loaded at a time. Each round also measures the
benchmark's reference (``loadtest.forward``: transformers' padded pass over blocks 1-15 at batch 8, all cores, in
its own process while the gateways idle), so every variant's c=16 rate is also a ratio to it, measured in the same
run (and, where the scorer's dtype is not bf16, to transformers' bf16 pass, the issue's literal reference). Prints
one JSON object: per variant, each figure's rounds and median, and the reference's. Used for the scorer's batching
settings in research/perf/README.md, e.g.::

    python -m loadtest.routed_ab --variant wait2 --variant wait10:ROUTER_SCORER__MAX_WAIT_MS=10
    python -m loadtest.routed_ab --variant default --variant math-pool=examples/math-pool.yaml
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from loadtest.gen import async_load
from loadtest.procs import Service, free_port
from loadtest.prompts import DATA, chat_body, questions
from loadtest.run import ROOT, _gateway_config, _measure, _scorer_counts


def parse_variant(text: str) -> tuple[str, Path, dict[str, str]]:
    head, _, assignments = text.partition(":")
    name, _, config = head.partition("=")
    env = dict(a.split("=", 1) for a in assignments.split(",") if a)
    return name, Path(config) if config else ROOT / "config.yaml", env


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.routed_ab", description=__doc__)
    parser.add_argument("--variant", action="append", required=True, help="NAME[=CONFIG][:VAR=VALUE,...]")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--data", type=Path, default=DATA, help="JSONL questions (a \"question\" field each)")
    parser.add_argument("--prompts", type=int, default=64, help="distinct questions drawn from --data")
    args = parser.parse_args()
    variants = {name: (config, env) for name, config, env in map(parse_variant, args.variant)}
    folder = Path(tempfile.mkdtemp(prefix="routed-ab-"))
    py = sys.executable
    port = free_port()
    backend = f"http://127.0.0.1:{port}"
    services = [Service("backend", [py, "-m", "loadtest.backend", "--port", str(port)], f"{backend}/health", folder)]
    urls: dict[str, str] = {}
    try:
        services[0].wait_ready(60)
        for name, (source, env) in variants.items():
            port = free_port()
            config = _gateway_config(folder, backend, port, source=source).rename(folder / f"{name}.yaml")
            service = Service(name, [py, "-m", "router", "--log-level", "warning", "serve", "--config", str(config)],
                              f"http://127.0.0.1:{port}/health", folder, env)
            services.append(service)
            service.wait_ready(300)
            urls[name] = f"http://127.0.0.1:{port}"
        bodies = [chat_body("router", q) for q in questions(args.prompts, data=args.data)]
        figures: dict[str, dict[str, list[float]]] = {
            n: {"c1_p50_ms": [], "c16_rps": [], "c16_mean_batch": []} for n in variants}
        names = list(variants)
        reference: list[float] = []
        emulated: list[float] = []  # transformers in bf16 where the scorer's dtype is another (loadtest.forward)
        for r in range(args.rounds):
            forward = _measure("loadtest.forward", ROOT / "config.yaml")
            rates = {b["pass"]: round(1000 / b["ms_per_prompt"], 2) for b in forward["batches"] if b["batch"] == 8}
            reference.append(rates["transformers"])
            if "transformers-bf16" in rates:
                emulated.append(rates["transformers-bf16"])
            for name in names[r % len(names):] + names[:r % len(names)]:
                url = f"{urls[name]}/v1/chat/completions"
                async_load(url, bodies, 8, 1, False)  # warm
                lone = async_load(url, bodies, 40, 1, False)
                passes, prompts = _scorer_counts(urls[name])
                loaded = async_load(url, bodies, 192, 16, False)
                passes_after, prompts_after = _scorer_counts(urls[name])
                if lone.errors or loaded.errors:
                    raise RuntimeError(f"{name}: {lone.errors + loaded.errors} failed requests; see {folder}")
                figures[name]["c1_p50_ms"].append(round(statistics.median(lone.latencies_s) * 1000, 1))
                figures[name]["c16_rps"].append(round(loaded.rps, 1))
                figures[name]["c16_mean_batch"].append(
                    round((prompts_after - prompts) / max(passes_after - passes, 1), 2))
        ref = statistics.median(reference)
        ref_bf16 = statistics.median(emulated) if emulated else None
        head = {"data": str(args.data), "prompts": len(bodies), "reference_prompts_per_s": {"rounds": reference,
                                                                                             "median": ref}}
        if ref_bf16:
            head["bf16_reference_prompts_per_s"] = {"rounds": emulated, "median": ref_bf16}
        print(json.dumps(head | {
            name: {"config": str(variants[name][0]), "env": variants[name][1], "rounds": f,
                   "median": {k: statistics.median(v) for k, v in f.items()},
                   "c16_vs_reference": round(statistics.median(f["c16_rps"]) / ref, 2)}
            | ({"c16_vs_bf16_reference": round(statistics.median(f["c16_rps"]) / ref_bf16, 2)} if ref_bf16 else {})
            for name, f in figures.items()}))
    finally:
        for service in reversed(services):
            service.stop()


if __name__ == "__main__":
    main()
