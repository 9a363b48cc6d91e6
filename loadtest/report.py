"""The results as Markdown: the table that ``docs/performance.md`` carries between its markers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

START, END = "<!-- bench:start -->", "<!-- bench:end -->"

LABELS = {"direct": "direct to backend", "floor": "bare FastAPI + aiohttp pass-through",
          "floor-httpx": "bare FastAPI + httpx pass-through",
          "floor-httpx-aiohttp": "bare FastAPI + httpx on aiohttp (httpx-aiohttp) pass-through",
          "gateway": "probe-router, explicit backend",
          "untuned": "probe-router, explicit backend, Python's default GC", "litellm": "LiteLLM proxy",
          "routed": "probe-router, routed (scorer)",
          "routed-vllm": "probe-router, routed (scorer on a vLLM CPU pooling server)"}

PASSES = {"scorer": "the scorer's pass", "transformers": "transformers' padded pass (the reference: blocks 1-15)",
          "transformers-recipe": "transformers' padded pass over the config's blocks",
          "transformers-bf16": "transformers' padded pass in bf16 (blocks 1-15; emulated on this CPU)"}

# (key, what, target, met(value))
TARGETS = (
    ("explicit_vs_floor_throughput", "explicit path throughput / bare pass-through (c=64)", "≥ 0.90",
     lambda v: v >= 0.9),
    ("gateway_added_p50_ms_c1", "explicit path added p50 at c=1 (ms)", "≤ 1.0", lambda v: v <= 1.0),
    ("explicit_vs_litellm_throughput", "explicit path throughput / LiteLLM (c=64)", "≥ 25×", lambda v: v >= 25),
    ("scorer_vs_forward_b1", "routed scorer cost per request / raw forward, batch 1 (c=1)", "≤ 1.10",
     lambda v: v <= 1.1),
    ("scorer_vs_forward_b8", "routed scorer cost per request / raw forward, batch 8 (c=16)", "≤ 1.10",
     lambda v: v <= 1.1),
    ("routed_c16_vs_transformers_b8",
     "routed prompts/s through HTTP (c=16) / transformers' padded pass (blocks 1-15), batch 8",
     "≥ 3.0", lambda v: v >= 3.0),
    ("routed_vllm_vs_explicit_gateway_cpu", "gateway CPU per routed request, vLLM scorer / explicit path", "≤ 2.0",
     lambda v: v <= 2.0),
    ("vllm_scorer_vs_local_forward_b8", "vLLM scorer prompts/s (best concurrency) / local forward, batch 8",
     "≥ 1.0", lambda v: v >= 1.0),
)


def fmt(v: float | None, digits: int = 2) -> str:
    return "–" if v is None else f"{v:,.{digits}f}"


def run_line(results: dict[str, Any]) -> str:
    """The first line of a run's table: when, how many rounds, on what machine."""
    m = results["machine"]
    return (f"Run of {results['started']}: {results['rounds']} interleaved rounds, {results['duration_s']:.0f} s; "
            f"{m['nproc']} cores ({m['cpu']}), {m['memory_gib']} GiB, Python {m['python']}.")


def publish(results: dict[str, Any], out: Path, markdown: Path, start: str, end: str, body: str) -> None:
    """A run's results as JSON in ``out``, and ``body`` between the markers ``start`` and ``end`` in ``markdown``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    replace_section(markdown, start, end, body)


def table(results: dict[str, Any]) -> str:
    lines = [
        run_line(results),
        "",
        "| scenario | target | req/s | p50 ms | p90 ms | p99 ms | TTFB p50 ms | TTFB p99 ms | CPU ms/req "
        "| peak RSS MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for scenario, targets in results["scenarios"].items():
        for target, r in targets.items():
            lat, ttfb = r["latency_ms"] or {}, r["ttfb_ms"] or {}
            cpu = fmt(r["cpu_ms_per_request"], 3)
            if target.startswith(("gateway", "untuned", "routed")) and r.get("loop_cpu_ms_per_request") is not None:
                cpu += f" (loop {fmt(r['loop_cpu_ms_per_request'], 3)})"
            errors = f" ({r['errors']} errors)" if r["errors"] else ""
            lines.append(
                f"| {scenario} | {LABELS[target]}{errors} | {fmt(r['rps'], 0)} | {fmt(lat.get('p50'))} "
                f"| {fmt(lat.get('p90'))} | {fmt(lat.get('p99'))} | {fmt(ttfb.get('p50'))} "
                f"| {fmt(ttfb.get('p99'))} | {cpu} | {fmt(r['peak_rss_mb'], 0)} |")
    f = results["forward_pass"]
    fwd = ", ".join(f"{PASSES[b.get('pass', 'scorer')]} batch {b['batch']}: {b['ms_per_batch']:.1f} ms per pass, "
                    f"{b['ms_per_prompt']:.1f} ms per prompt" for b in f["batches"])
    per_round = f"; median of {f['rounds']} rounds, each measured next to that round's routed scenarios" \
        if f.get("rounds", 1) > 1 else ""
    lines += ["", f"Scorer forward pass alone ({f['dtype']}, {f['threads']} threads, layers {f['layers']}, "
              f"{f['prompts']} GSM8K prompts{per_round}): {fwd}.", ""]
    if "roofline" in f:
        r = f["roofline"]
        lines += [f"Roofline: the scorer's pass executes {r['gflop_per_prompt']:.2f} GFLOP a prompt "
                  f"(transformers' padded batch of 8: {r['transformers_gflop_per_prompt']:.2f}; prompts of "
                  f"{r['mean_prompt_tokens']:.0f} tokens on average, {r['prefix_tokens']} of them the shared prefix) "
                  f"at {r['scorer_gflops']:.0f} GFLOP/s, {r['scorer_vs_limit']:.0%} of this machine's "
                  f"{r['matmul_gflops']:.0f} GFLOP/s for the same projections at {r['matmul_rows']} rows "
                  f"({f['dtype']}, {r.get('threads', f['threads'])} threads); transformers' padded pass runs at "
                  f"{r['transformers_gflops']:.0f} GFLOP/s, "
                  f"{r['transformers_vs_limit']:.0%} of {r.get('transformers_matmul_gflops', r['matmul_gflops']):.0f} "
                  f"({r.get('reference_threads', f['threads'])} threads).", ""]
    if results.get("scorer_server"):
        cells = "; ".join(f"c={c}: {r['rps']:,.1f} prompts/s, p50 {fmt((r['latency_ms'] or {}).get('p50'), 1)} ms, "
                          f"{fmt(r['cpu_ms_per_request'], 1)} ms of its CPU a prompt"
                          for c, r in results["scorer_server"].items())
        lines += [f"The vLLM CPU pooling scorer loaded directly (token ids as the gateway sends them): {cells}.", ""]
    if "gc" in results:
        g = results["gc"]
        lines += [f"Garbage collector, in a process loaded as the gateway is: {g['tracked_objects']:,} tracked "
                  f"objects; a full collection takes {g['full_collection_ms']:,.1f} ms, "
                  f"{g['full_collection_us_frozen']:,.1f} µs after `gc.freeze()`.", ""]
    lines += [
              "| target | measured | goal | met |", "|---|---:|---:|:---:|"]
    t = results["targets"]
    for key, what, goal, met in TARGETS:
        if key in t:
            lines.append(f"| {what} | {t[key]:,.3g} | {goal} | {'yes' if met(t[key]) else 'no'} |")
    extra = [f"{k} = {v}" for k, v in t.items() if k not in {key for key, *_ in TARGETS}]
    if extra:
        lines += ["", "Also derived: " + "; ".join(extra) + "."]
    return "\n".join(lines)


def replace_section(path: Path, start: str, end: str, body: str) -> None:
    """Replace the text between the markers ``start`` and ``end`` in ``path`` (added at its end if missing)."""
    block = f"{start}\n{body}\n{end}"
    text = path.read_text() if path.exists() else f"# Benchmarks\n\n{start}\n{end}\n"
    if start not in text or end not in text:
        text = text.rstrip() + f"\n\n{start}\n{end}\n"
    head, _, rest = text.partition(start)
    _, _, tail = rest.partition(end)
    path.write_text(head + block + tail)

