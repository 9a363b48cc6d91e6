"""One benchmark run: start every target on 127.0.0.1, load them in interleaved rounds, write the results.

Targets: ``direct`` (the fake backend itself), ``floor`` (bare FastAPI + aiohttp pass-through), ``gateway``
(``python -m router serve``; requests naming a backend, so nothing is scored), ``litellm`` (LiteLLM proxy in
its own virtualenv) and ``routed`` (the same gateway with ``model: "router"``: real scorer, shipped probes).
Each round runs every scenario on every target, the target order rotating from round to round, so machine
noise falls on all of them alike.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from loadtest.gen import Load, async_load, hey_load, percentiles_ms
from loadtest.procs import Service, Watch, free_port
from loadtest.prompts import chat_body, median_question, questions
from loadtest.proxy import CLIENTS

ROOT = Path(__file__).resolve().parent.parent
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
SMALL_NAME, SMALL_MODEL = "qwen2.5-math-1.5b", "Qwen/Qwen2.5-Math-1.5B-Instruct"


@dataclass(frozen=True)
class Scenario:
    name: str
    targets: tuple[str, ...]
    concurrency: int
    stream: bool = False
    tool: str = "hey"  # or "async"
    varied_prompts: bool = False


SCENARIOS = (
    Scenario("chat c=64", ("direct", "floor", "floor-httpx", "floor-httpx-aiohttp", "gateway", "untuned", "litellm"),
             64),
    Scenario("chat c=1", ("direct", "floor", "floor-httpx", "floor-httpx-aiohttp", "gateway", "litellm"), 1),
    Scenario("stream c=16", ("direct", "floor", "gateway", "litellm"), 16, stream=True, tool="async"),
    Scenario("routed c=1", ("gateway", "routed", "routed-vllm"), 1, tool="async", varied_prompts=True),
    Scenario("routed c=16", ("routed", "routed-vllm"), 16, tool="async", varied_prompts=True),
)
SCORER_CONCURRENCY = (1, 4, 16)  # the vLLM pooling server loaded directly, at each of these


@dataclass
class Cell:
    """Every round of one scenario on one target."""

    rps: list[float] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)
    ttfb_s: list[float] = field(default_factory=list)
    requests: int = 0
    errors: int = 0
    cpu_s: float = 0.0
    loop_cpu_s: float = 0.0
    peak_rss_mb: float = 0.0
    batches: float = 0.0
    scored: float = 0.0

    def summary(self) -> dict[str, Any]:
        ok = self.requests - self.errors
        out: dict[str, Any] = {
            "rps": round(sorted(self.rps)[len(self.rps) // 2], 1),  # the median round
            "rps_rounds": [round(r, 1) for r in self.rps],
            "requests": self.requests, "errors": self.errors,
            "latency_ms": percentiles_ms(self.latencies_s),
            "mean_latency_ms": round(sum(self.latencies_s) / len(self.latencies_s) * 1000, 3)
            if self.latencies_s else None,
            "ttfb_ms": percentiles_ms(self.ttfb_s),
            "cpu_ms_per_request": round(self.cpu_s / ok * 1000, 3) if ok else None,
            "loop_cpu_ms_per_request": round(self.loop_cpu_s / ok * 1000, 3) if ok else None,
            "peak_rss_mb": round(self.peak_rss_mb, 1),
        }
        if self.batches:
            out["mean_scorer_batch"] = round(self.scored / self.batches, 2)
            out["scored_share"] = round(self.scored / self.requests, 3)  # below 1: some went unscored (shed)
        return out


# One torch thread per core, as the gateway runs by default: with passive OpenMP waiting and the packed pass, the
# event loop finds its CPU between passes (routed c=16 here: 13-16 req/s with nproc - 1 = 1 thread, 18-22 with 2;
# docs/benchmarks.md). The vLLM scorer gets as many OpenMP threads, bound to the same cores.
SCORER_THREADS = os.cpu_count() or 1


def _gateway_config(folder: Path, backend_url: str, port: int, scorer_url: str | None = None,
                    source: Path = ROOT / "config.yaml") -> Path:
    """``source``'s scorer, probes and policy, every backend on ``backend_url``, served on ``port``."""
    base = yaml.safe_load(source.read_text())
    scorer = {**base["scorer"], "cache_dir": str(ROOT / ".cache"), "threads": SCORER_THREADS}
    if scorer_url is not None:
        scorer |= {"kind": "vllm", "url": scorer_url}
    backends = [{**b, "base_url": f"{backend_url}/v1", "probe": str((source.parent / b["probe"]).resolve())}
                for b in base["backends"]]
    config = {"scorer": scorer, "backends": backends, "policy": base["policy"],
              "server": {"host": "127.0.0.1", "port": port}}
    path = folder / ("gateway-vllm.yaml" if scorer_url else "gateway.yaml")
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _scorer_server(port: int) -> tuple[list[str], dict[str, str]]:
    """The command and environment of a vLLM CPU pooling server for the shipped scorer recipe."""
    from router import load_settings
    from router.scorer import resolve_model, truncate_model, vllm_pooling_args

    cfg = load_settings(ROOT / "config.yaml").scorer
    served = truncate_model(resolve_model(cfg.model, cfg.cache_dir), max(cfg.layers), cfg.cache_dir)
    cores = os.cpu_count() or 1
    bind = ",".join(str(c) for c in range(cores - SCORER_THREADS, cores))
    argv = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(served),
            "--host", "127.0.0.1", "--port", str(port), "--enforce-eager", "--max-model-len", "2048",
            "--kv-cache-memory-bytes", str(256 * 1024 * 1024), "--max-num-seqs", "64", "--disable-log-stats",
            *vllm_pooling_args(cfg)]
    env = {"VLLM_CPU_OMP_THREADS_BIND": bind, "OMP_NUM_THREADS": str(SCORER_THREADS), "OMP_WAIT_POLICY": "PASSIVE",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return argv, env


def _litellm_config(folder: Path, backend_url: str) -> Path:
    config = {
        "model_list": [{"model_name": SMALL_NAME, "litellm_params": {
            "model": f"openai/{SMALL_MODEL}", "api_base": f"{backend_url}/v1", "api_key": "unused"}}],
        "litellm_settings": {"drop_params": True, "telemetry": False},
    }
    path = folder / "litellm.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _scorer_counts(gateway_url: str) -> tuple[float, float]:
    """(forward passes, prompts scored) so far, from the gateway's /metrics."""
    text = urllib.request.urlopen(f"{gateway_url}/metrics", timeout=5).read().decode()
    count = re.search(r"^router_scorer_batch_size_count (\S+)$", text, re.M)
    total = re.search(r"^router_scorer_batch_size_sum (\S+)$", text, re.M)
    return float(count.group(1)) if count else 0.0, float(total.group(1)) if total else 0.0


class Bench:
    def __init__(self, folder: Path, litellm_bin: Path | None, run_s: float) -> None:
        self.folder = folder
        self.run_s = run_s
        self.services: dict[str, Service] = {}
        self.urls: dict[str, str] = {}
        self.models = {"direct": SMALL_MODEL, "floor": SMALL_MODEL, "floor-httpx": SMALL_MODEL,
                       "floor-httpx-aiohttp": SMALL_MODEL, "gateway": SMALL_NAME, "untuned": SMALL_NAME,
                       "litellm": SMALL_NAME, "routed": "router", "routed-vllm": "router"}
        self.litellm_bin = litellm_bin
        self.gateway_config: Path | None = None

    def start(self) -> None:
        py = sys.executable
        ports = {n: free_port() for n in ("backend", "gateway", "untuned", "litellm", "scorer", "gateway-vllm")}
        backend = f"http://127.0.0.1:{ports['backend']}"
        self._add("direct", [py, "-m", "loadtest.backend", "--port", str(ports["backend"])], backend, "/health")
        for client in CLIENTS:  # the floor (aiohttp) and the same proxy on the other clients the issue names
            name, port = ("floor" if client == "aiohttp" else f"floor-{client}"), free_port()
            self._add(name, [py, "-m", "loadtest.proxy", "--port", str(port), "--upstream", backend,
                             "--client", client], f"http://127.0.0.1:{port}", "/health")
        self.gateway_config = _gateway_config(self.folder, backend, ports["gateway"])
        self._add("gateway", [py, "-m", "router", "--log-level", "warning", "serve", "--config",
                              str(self.gateway_config)], f"http://127.0.0.1:{ports['gateway']}", "/health")
        self.urls["routed"] = self.urls["gateway"]
        # The same gateway with Python's garbage collector as it comes: what server.gc_freeze and
        # server.gc_young_threshold are worth, measured in the same run.
        self._add("untuned", [py, "-m", "router", "--log-level", "warning", "serve", "--config",
                              str(self.gateway_config), "--port", str(ports["untuned"])],
                  f"http://127.0.0.1:{ports['untuned']}", "/health",
                  env={"ROUTER_SERVER__GC_FREEZE": "false", "ROUTER_SERVER__GC_YOUNG_THRESHOLD": "700"})
        if VLLM_PYTHON.exists():  # the same routing with the scorer on a vLLM CPU pooling server
            argv, env = _scorer_server(ports["scorer"])
            self._add("scorer", argv, f"http://127.0.0.1:{ports['scorer']}", "/health", env=env)
            self.services["scorer"].wait_ready(600)  # before its gateway, whose first requests need it
            config = _gateway_config(self.folder, backend, ports["gateway-vllm"], f"{self.urls['scorer']}/v1")
            self._add("gateway-vllm", [py, "-m", "router", "--log-level", "warning", "serve", "--config",
                                       str(config)], f"http://127.0.0.1:{ports['gateway-vllm']}", "/health")
            self.urls["routed-vllm"] = self.urls["gateway-vllm"]
        if self.litellm_bin is not None:
            self._add("litellm", [str(self.litellm_bin), "--config", str(_litellm_config(self.folder, backend)),
                                  "--host", "127.0.0.1", "--port", str(ports["litellm"]), "--num_workers", "1"],
                      f"http://127.0.0.1:{ports['litellm']}", "/health/liveliness",
                      env={"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR",
                           "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true"})  # no auth, like the others
        for service in self.services.values():
            service.wait_ready(300)

    def _add(self, name: str, argv: list[str], url: str, ready: str, env: dict[str, str] | None = None) -> None:
        self.services[name] = Service(name, argv, url + ready, self.folder, env)
        self.urls[name] = url

    def stop(self) -> None:
        for service in reversed(self.services.values()):
            service.stop()

    def service_of(self, target: str) -> Service:
        return self.services[{"routed": "gateway", "routed-vllm": "gateway-vllm"}.get(target, target)]

    def scorer_load(self, concurrency: int, requests: int) -> tuple[Load, Watch]:
        """The pooling server alone: token ids of the routed scenarios' prompts, as the gateway sends them."""
        from router import load_settings
        from router.scorer import PromptEncoder, resolve_model

        cfg = load_settings(ROOT / "config.yaml").scorer
        encoder = PromptEncoder(resolve_model(cfg.model, cfg.cache_dir).path, cfg.max_prompt_tokens)
        bodies = [json.dumps({"model": cfg.served_model, "input": [encoder.encode([{"role": "user", "content": t}])],
                              "encoding_format": "base64"}).encode() for t in questions(64)]
        with Watch(self.services["scorer"]) as watch:
            load = async_load(f"{self.urls['scorer']}/v1/embeddings", bodies, requests, concurrency, False)
        return load, watch

    def load(self, scenario: Scenario, target: str, requests: int) -> tuple[Load, Watch]:
        url = f"{self.urls[target]}/v1/chat/completions"
        model = self.models[target]
        texts = questions(64) if scenario.varied_prompts else [median_question()]
        bodies = [chat_body(model, t, scenario.stream) for t in texts]
        with Watch(self.service_of(target)) as watch:
            if scenario.tool == "hey":
                load = hey_load(url, bodies[0], requests, scenario.concurrency)
            else:
                load = async_load(url, bodies, requests, scenario.concurrency, scenario.stream)
        return load, watch

    def size(self, scenario: Scenario, target: str) -> int:
        """Requests for one run of about ``run_s`` seconds, from a short warm-up run's rate."""
        warm = 16 if target.startswith("routed") or (target == "litellm" and scenario.concurrency == 1) else 128
        load, _ = self.load(scenario, target, max(warm, scenario.concurrency * 2))
        n = int(load.rps * self.run_s)
        return max(scenario.concurrency * 4, min(3000, n // scenario.concurrency * scenario.concurrency))


def _measure(module: str, config: Path) -> dict[str, Any]:
    """Run ``python -m module --config config`` in its own process; its last line of output is JSON."""
    out = subprocess.run([sys.executable, "-m", module, "--config", str(config)], capture_output=True,
                         text=True, check=True, timeout=600, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])


def run(rounds: int, run_s: float, litellm_bin: Path | None, log: Callable[[str], None]) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="loadtest-"))
    bench = Bench(folder, litellm_bin, run_s)
    started = time.time()
    try:
        log(f"starting targets (logs in {folder})")
        bench.start()
        scenarios = [s for s in SCENARIOS if any(t in bench.urls for t in s.targets)]
        sizes = {}
        for s in scenarios:
            for t in s.targets:
                if t in bench.urls:
                    sizes[s.name, t] = bench.size(s, t)
        log(f"requests per run: {sizes}")
        assert bench.gateway_config is not None
        log("the garbage collector's full collection, with and without gc.freeze()")
        gc_cost = _measure("loadtest.gc_cost", bench.gateway_config)
        cells: dict[tuple[str, str], Cell] = {key: Cell() for key in sizes}
        scorer_cells: dict[int, Cell] = {}
        forwards: list[dict[str, Any]] = []
        first_routed = next((s for s in scenarios if "routed" in s.targets), None)
        for r in range(rounds):
            for s in scenarios:
                if s is first_routed:  # the raw pass it is compared with, measured next to it in every round
                    log(f"round {r + 1}/{rounds} scorer forward pass alone (batch 1 and 8)")
                    forwards.append(_measure("loadtest.forward", bench.gateway_config))
                targets = [t for t in s.targets if t in bench.urls]
                targets = targets[r % len(targets):] + targets[:r % len(targets)]
                if s.name == "routed c=16" and "scorer" in bench.urls:
                    for c in SCORER_CONCURRENCY:
                        load, watch = bench.scorer_load(c, 8 * c + 32)
                        scorer_cells.setdefault(c, Cell())
                        scorer_cells[c].rps.append(load.rps)
                        scorer_cells[c].latencies_s += load.latencies_s
                        scorer_cells[c].requests += load.requests
                        scorer_cells[c].errors += load.errors
                        scorer_cells[c].cpu_s += watch.usage.cpu_s
                        log(f"round {r + 1}/{rounds} vLLM scorer alone c={c} {load.rps:8.1f} prompts/s")
                for t in targets:
                    before = _scorer_counts(bench.urls["gateway"]) if t == "routed" else (0.0, 0.0)
                    load, watch = bench.load(s, t, sizes[s.name, t])
                    after = _scorer_counts(bench.urls["gateway"]) if t == "routed" else (0.0, 0.0)
                    cell = cells[s.name, t]
                    cell.rps.append(load.rps)
                    cell.latencies_s += load.latencies_s
                    cell.ttfb_s += load.ttfb_s
                    cell.requests += load.requests
                    cell.errors += load.errors
                    cell.cpu_s += watch.usage.cpu_s
                    cell.loop_cpu_s += watch.usage.loop_cpu_s
                    cell.peak_rss_mb = max(cell.peak_rss_mb, watch.usage.peak_rss_mb)
                    cell.batches += after[0] - before[0]
                    cell.scored += after[1] - before[1]
                    log(f"round {r + 1}/{rounds} {s.name:12} {t:8} {load.rps:8.1f} req/s  "
                        f"errors {load.errors}")
    finally:
        bench.stop()
    results: dict[str, Any] = {s.name: {t: cells[s.name, t].summary() for t in s.targets if (s.name, t) in cells}
                               for s in scenarios}
    forward = median_forward(forwards)
    scorer_server = {str(c): cell.summary() for c, cell in scorer_cells.items()}
    return {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "duration_s": round(time.time() - started, 1), "rounds": rounds, "machine": machine(),
            "scenarios": results, "forward_pass": forward, "gc": gc_cost, "scorer_server": scorer_server,
            "targets": derive(results, forward, scorer_server)}


def median_forward(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One forward-pass result from several rounds' (same settings): per pass and batch size, the median round;
    the roofline of the round whose scorer batch-8 pass is the median."""
    batches = []
    for i, first in enumerate(runs[0]["batches"]):
        per_prompt = [run["batches"][i]["ms_per_prompt"] for run in runs]
        per_batch = [run["batches"][i]["ms_per_batch"] for run in runs]
        batches.append({"pass": first.get("pass", "scorer"), "batch": first["batch"],
                        "ms_per_batch": statistics.median(per_batch),
                        "ms_per_prompt": statistics.median(per_prompt), "ms_per_prompt_rounds": per_prompt})
    out = {**runs[0], "batches": batches, "rounds": len(runs)}
    if all("roofline" in run for run in runs):
        b8 = [b["batch"] == 8 and b.get("pass", "scorer") == "scorer" for b in runs[0]["batches"]].index(True)
        ordered = sorted(runs, key=lambda run: run["batches"][b8]["ms_per_prompt"])
        out["roofline"] = ordered[len(ordered) // 2]["roofline"]
    return out


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown")
    mem_kb = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal")))
    return {"nproc": os.cpu_count(), "cpu": cpu, "memory_gib": round(mem_kb / 2**20, 1),
            "python": sys.version.split()[0]}


def _get(results: dict[str, Any], scenario: str, target: str, *keys: str) -> float | None:
    value: Any = results.get(scenario, {}).get(target)
    for k in keys:
        if value is None:
            return None
        value = value.get(k)
    return value


def derive(results: dict[str, Any], forward: dict[str, Any],
           scorer_server: dict[str, Any] | None = None) -> dict[str, Any]:
    """The issue's targets as ratios of figures from this one run."""
    out: dict[str, Any] = {}
    gw, floor, lite = (_get(results, "chat c=64", t, "rps") for t in ("gateway", "floor", "litellm"))
    if gw and floor:
        out["explicit_vs_floor_throughput"] = round(gw / floor, 3)
    if gw and lite:
        out["explicit_vs_litellm_throughput"] = round(gw / lite, 1)
    untuned = _get(results, "chat c=64", "untuned", "rps")
    if gw and untuned:
        out["explicit_vs_untuned_gc_throughput"] = round(gw / untuned, 2)
    direct_p50 = _get(results, "chat c=1", "direct", "latency_ms", "p50")
    for t in ("floor", "floor-httpx", "floor-httpx-aiohttp", "gateway", "litellm"):
        p50 = _get(results, "chat c=1", t, "latency_ms", "p50")
        if p50 is not None and direct_p50 is not None:
            out[f"{t}_added_p50_ms_c1"] = round(p50 - direct_p50, 3)
    fwd = {b["batch"]: b["ms_per_prompt"] for b in forward["batches"] if b.get("pass", "scorer") == "scorer"}
    reference = next((b["ms_per_prompt"] for b in forward["batches"] if b.get("pass") == "transformers"), None)
    routed1 = _get(results, "routed c=1", "routed", "mean_latency_ms")
    plain1 = _get(results, "routed c=1", "gateway", "mean_latency_ms")
    if routed1 is not None and plain1 is not None:
        out["scorer_ms_per_request_c1"] = round(routed1 - plain1, 3)
        out["scorer_vs_forward_b1"] = round((routed1 - plain1) / fwd[1], 3)
        routed1_p50 = _get(results, "routed c=1", "routed", "latency_ms", "p50")
        plain1_p50 = _get(results, "routed c=1", "gateway", "latency_ms", "p50")
        if routed1_p50 is not None and plain1_p50 is not None:
            out["scorer_p50_ms_c1"] = round(routed1_p50 - plain1_p50, 1)
    rps16 = _get(results, "routed c=16", "routed", "rps")
    if rps16:
        out["scorer_ms_per_request_c16"] = round(1000 / rps16, 3)
        out["scorer_vs_forward_b8"] = round(1000 / rps16 / fwd[8], 3)
        out["routed_c16_mean_batch"] = _get(results, "routed c=16", "routed", "mean_scorer_batch")
        if reference:
            out["routed_c16_vs_transformers_b8"] = round(rps16 / (1000 / reference), 2)
        same_blocks = next((b["ms_per_prompt"] for b in forward["batches"] if b.get("pass") == "transformers-recipe"),
                           None)
        if same_blocks:
            out["routed_c16_vs_transformers_recipe_b8"] = round(rps16 / (1000 / same_blocks), 2)
        bf16 = next((b["ms_per_prompt"] for b in forward["batches"] if b.get("pass") == "transformers-bf16"), None)
        if bf16:
            out["routed_c16_vs_transformers_bf16_b8"] = round(rps16 / (1000 / bf16), 2)
        scored = _get(results, "routed c=16", "routed", "scored_share")
        if scored is not None:
            out["routed_c16_scored_share"] = scored
        cpu = _get(results, "routed c=16", "routed", "cpu_ms_per_request")
        loop = _get(results, "routed c=16", "routed", "loop_cpu_ms_per_request")
        if cpu is not None and loop is not None:
            out["routed_c16_gateway_loop_cpu_ms"] = loop
            out["routed_c16_scorer_cpu_ms"] = round(cpu - loop, 3)
    remote = _get(results, "routed c=16", "routed-vllm", "cpu_ms_per_request")
    explicit = _get(results, "chat c=64", "gateway", "cpu_ms_per_request")
    if remote is not None and explicit:
        out["routed_vllm_gateway_cpu_ms"] = remote
        out["routed_vllm_vs_explicit_gateway_cpu"] = round(remote / explicit, 2)
    remote_rps = _get(results, "routed c=16", "routed-vllm", "rps")
    if remote_rps and rps16:
        out["routed_vllm_vs_local_throughput_c16"] = round(remote_rps / rps16, 2)
    if scorer_server:
        best = max(cell["rps"] for cell in scorer_server.values())
        out["vllm_scorer_best_prompts_per_s"] = best
        out["vllm_scorer_vs_local_forward_b8"] = round(best / (1000 / fwd[8]), 2)
    return out
