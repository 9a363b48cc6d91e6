"""vLLM's own benchmark client against the demo's real vLLM CPU stand-ins: direct, explicit and routed.

Starts ``python -m scripts.demo`` (two vLLM CPU servers running SmolLM2-135M-Instruct and the gateway; with
``--scorer vllm`` also a vLLM CPU pooling scorer) on free ports, then runs ``vllm.benchmarks.serve``
(``--backend openai-chat``, random prompts, ``--ignore-eos``) in interleaved rounds against three targets:
``direct`` (the cheap stand-in itself), ``explicit`` (the gateway, ``model`` naming the cheap backend: nothing is
scored) and ``routed`` (the gateway, ``model: "router"``: every request scored). Each round sends every target the
same prompts (one seed per round). Stops the demo with SIGTERM to its process group.

    python -m loadtest.demo_bench --out loadtest/results/demo.json --markdown docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from loadtest.procs import free_port
from loadtest.report import publish

ROOT = Path(__file__).resolve().parent.parent
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
SMALL_NAME, SMALL_MODEL = "qwen2.5-math-1.5b", "Qwen/Qwen2.5-Math-1.5B-Instruct"
TARGETS = ("direct", "explicit", "routed")
CLIENT = ("import sys\nfrom vllm.benchmarks.serve import add_cli_args, main\n"
          "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
          "parser = FlexibleArgumentParser()\nadd_cli_args(parser)\nmain(parser.parse_args(sys.argv[1:]))\n")
START, END = "<!-- demo-bench:start -->", "<!-- demo-bench:end -->"


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


def _routes(gateway: str) -> dict[str, float]:
    """Routed requests so far by backend, from the gateway's /metrics."""
    out: dict[str, float] = {}
    for m in re.finditer(r'^router_requests_total\{([^}]*)\} (\S+)$', _get(f"{gateway}/metrics"), re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if labels.get("reason") != "explicit_backend":
            out[labels["backend"]] = out.get(labels["backend"], 0.0) + float(m.group(2))
    return out


class Demo:
    """``python -m scripts.demo`` on free ports, in a process group of its own."""

    def __init__(self, scorer: str, log: Path) -> None:
        self.ports = {"small": free_port(), "large": free_port(), "gateway": free_port(), "scorer": free_port()}
        env = dict(os.environ, QWEN_SMALL_URL=f"http://127.0.0.1:{self.ports['small']}/v1",
                   QWEN_LARGE_URL=f"http://127.0.0.1:{self.ports['large']}/v1",
                   ROUTER_SERVER__PORT=str(self.ports["gateway"]), DEMO_SCORER_PORT=str(self.ports["scorer"]))
        self._log = log.open("wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "scripts.demo", "--scorer", scorer], cwd=ROOT, env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        self.gateway = f"http://127.0.0.1:{self.ports['gateway']}"
        self.small = f"http://127.0.0.1:{self.ports['small']}"

    def wait_ready(self, timeout_s: float = 900) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the demo exited ({self.proc.returncode}); see {self._log.name}")
            try:
                _get(f"{self.gateway}/ready")
                return
            except OSError:
                time.sleep(2)
        raise RuntimeError(f"the demo was not ready in {timeout_s:.0f} s; see {self._log.name}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(180)
        self._log.close()


def _client(base_url: str, model: str, tokenizer: Path, seed: int, args: argparse.Namespace,
            folder: Path) -> dict[str, Any]:
    name = f"r{seed}-{abs(hash((base_url, model))) % 10**8}.json"
    cmd = [str(VLLM_PYTHON), "-c", CLIENT, "--backend", "openai-chat", "--base-url", base_url,
           "--endpoint", "/v1/chat/completions", "--model", model, "--tokenizer", str(tokenizer),
           "--dataset-name", "random", "--random-input-len", str(args.input_len),
           "--random-output-len", str(args.output_len), "--num-prompts", str(args.prompts),
           "--max-concurrency", str(args.concurrency), "--ignore-eos", "--seed", str(seed),
           "--ready-check-timeout-sec", "0", "--disable-tqdm",
           "--save-result", "--result-dir", str(folder), "--result-filename", name]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=600,
                   env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"))
    return json.loads((folder / name).read_text())


def run_kind(scorer: str, args: argparse.Namespace, say: Any) -> dict[str, Any]:
    from router import load_settings
    from router.scorer import resolve_model

    settings = load_settings(ROOT / "config.yaml")
    tokenizer = resolve_model(settings.scorer.model, settings.scorer.cache_dir).path
    cells: dict[str, list[dict[str, Any]]] = {t: [] for t in TARGETS}
    with tempfile.TemporaryDirectory(prefix="demo-bench-") as tmp:
        demo = Demo(scorer, Path(tmp) / "demo.log")
        try:
            say(f"starting the demo (scorer {scorer}) ...")
            demo.wait_ready()
            before = _routes(demo.gateway)
            urls = {"direct": (demo.small, SMALL_MODEL), "explicit": (demo.gateway, SMALL_NAME),
                    "routed": (demo.gateway, "router")}
            for r in range(args.rounds):
                order = TARGETS[r % 3:] + TARGETS[:r % 3]
                for target in order:
                    base, model = urls[target]
                    result = _client(base, model, tokenizer, seed=r, args=args, folder=Path(tmp))
                    cells[target].append(result)
                    say(f"  round {r + 1} {target:8s} mean TTFT {result['mean_ttft_ms']:.0f} ms, "
                        f"{result['request_throughput']:.2f} req/s, {result['completed']} ok, "
                        f"{result.get('failed', 0)} failed")
            after = _routes(demo.gateway)
        finally:
            demo.stop()
    out: dict[str, Any] = {}
    for target, results in cells.items():
        out[target] = {
            "mean_ttft_ms": round(statistics.median(r["mean_ttft_ms"] for r in results), 1),
            "mean_ttft_ms_rounds": [round(r["mean_ttft_ms"], 1) for r in results],
            "p99_ttft_ms": round(statistics.median(r["p99_ttft_ms"] for r in results), 1),
            "req_per_s": round(statistics.median(r["request_throughput"] for r in results), 3),
            "completed": sum(r["completed"] for r in results),
            "failed": sum(r.get("failed", 0) for r in results),
        }
    out["routed_to"] = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    out["routed_over_direct_ttft"] = round(out["routed"]["mean_ttft_ms"] / out["direct"]["mean_ttft_ms"], 3)
    return out


def table(results: dict[str, Any]) -> str:
    p = results["params"]
    lines = [
        f"vLLM's benchmark client (`vllm.benchmarks.serve --backend openai-chat`, random prompts of {p['input_len']} "
        f"tokens, {p['output_len']} output tokens with `--ignore-eos`, {p['prompts']} requests at concurrency "
        f"{p['concurrency']}, {p['rounds']} interleaved rounds, the median round) against `make demo`'s two vLLM "
        f"CPU stand-ins, on {results['machine']}:",
        "",
        "| scorer | target | mean TTFT ms | p99 TTFT ms | req/s | ok | failed | TTFT vs direct |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for kind, cells in results["scorers"].items():
        direct = cells["direct"]["mean_ttft_ms"]
        for target in TARGETS:
            c = cells[target]
            lines.append(f"| {kind} | {target} | {c['mean_ttft_ms']:.0f} | {c['p99_ttft_ms']:.0f} | "
                         f"{c['req_per_s']:.2f} | {c['completed']} | {c['failed']} | "
                         f"{c['mean_ttft_ms'] / direct:.2f}× |")
    for kind, cells in results["scorers"].items():
        routes = ", ".join(f"{k} {v:.0f}" for k, v in sorted(cells["routed_to"].items()))
        lines.append(f"\nRouted requests went to (scorer {kind}): {routes}.")
    lines.append(f"\nCommand: `{results['command']}`")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.demo_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scorers", default="local", help="comma-separated: local, vllm")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=40)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--out", type=Path, default=ROOT / "loadtest" / "results" / "demo.json")
    parser.add_argument("--markdown", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)
    # SIGTERM (timeout, a CI runner) unwinds like Ctrl-C, so each round's `finally` stops the demo it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    import platform

    amx = "amx_bf16" in Path("/proc/cpuinfo").read_text()
    results = {
        "machine": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
                   f"{'with' if amx else 'no'} AMX",
        "params": {k: getattr(args, k) for k in ("rounds", "prompts", "concurrency", "input_len", "output_len")},
        "command": "python -m loadtest.demo_bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "scorers": {kind: run_kind(kind, args, lambda s: print(s, flush=True)) for kind in args.scorers.split(",")},
    }
    publish(results, args.out, args.markdown, START, END, table(results))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
