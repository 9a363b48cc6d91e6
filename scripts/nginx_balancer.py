"""The nginx that balances gateway replicas on one host (Debian's nginx): ``make demo-fleet`` and the fleet
benchmark (loadtest/fleet.py) both render it here, so both run the same configuration. Where nginx forwards a
request is ``deploy/nginx/proxy.conf`` (also docker-compose.yml's); this adds the upstream of replica ports, the
listener and a folder for everything nginx writes."""

from __future__ import annotations

import shutil
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

from scripts.vllm_cpu import ROOT, stop_with_parent

PROXY_CONF = ROOT / "deploy" / "nginx" / "proxy.conf"


def nginx_conf(folder: Path, listen: str, replicas: Sequence[int], max_body_bytes: int) -> str:
    """A foreground nginx balancing ``replicas`` (round robin) with everything it writes under ``folder``."""
    servers = "\n".join(f"        server 127.0.0.1:{port} max_fails=1 fail_timeout=5s;" for port in replicas)
    kinds = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    temp = "\n".join(f"    {kind}_temp_path {folder}/{kind};" for kind in kinds)
    return f"""# written by scripts/nginx_balancer.py
worker_processes 1;
pid {folder}/nginx.pid;
error_log {folder}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log {folder}/access.log;
{temp}
    upstream gateways {{
{servers}
        keepalive 32;
    }}
    server {{
        listen {listen};
        client_max_body_size {max_body_bytes};
        location / {{
            include {PROXY_CONF};
        }}
    }}
}}
"""


def nginx_command(folder: Path, conf: str) -> list[str]:
    """Write ``conf`` to ``folder``/nginx.conf; the command that runs it in the foreground."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(binary).exists():
        raise RuntimeError("nginx is missing: run scripts/install_system_tools.sh (Debian nginx)")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "nginx.conf"
    path.write_text(conf)
    return [binary, "-p", str(folder), "-c", str(path), "-e", str(folder / "error.log"), "-g", "daemon off;"]


def start_nginx(folder: Path, conf: str) -> subprocess.Popen[bytes]:
    """nginx in a process group of its own, stopped by the kernel if the process that started it dies."""
    return subprocess.Popen(nginx_command(folder, conf), start_new_session=True, preexec_fn=stop_with_parent)


def stop_balancer(nginx: subprocess.Popen[bytes]) -> None:
    """SIGQUIT: nginx stops accepting, lets the requests in flight finish, then exits."""
    if nginx.poll() is not None:
        return
    nginx.send_signal(signal.SIGQUIT)
    try:
        nginx.wait(30)
    except subprocess.TimeoutExpired:
        nginx.kill()
        nginx.wait()
