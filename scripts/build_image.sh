#!/usr/bin/env bash
# The images of the deploy files, built on this machine's Docker engine (make image, make test-image):
#
#   scripts/build_image.sh [gateway]    build the gateway image IMAGE (probe-router:local) from ./Dockerfile
#   scripts/build_image.sh prometheus   print the Prometheus image to run: PROMETHEUS_IMAGE when it is here or
#                                       can be pulled, else one built from Debian's prometheus package
#
# Where a registry cannot be reached (offline or corporate sites), the official images are replaced by
# equivalents built from Debian packages with mmdebstrap and `docker import`, once (they are kept by tag):
#   PYTHON_IMAGE (python:3.11-slim)         -> LOCAL_BASE (probe-router-base:bookworm): minbase + python3 3.11
#   PROMETHEUS_IMAGE (prom/prometheus:...)  -> LOCAL_PROMETHEUS (probe-router-prometheus:bookworm)
# The gateway is built from the same Dockerfile either way (--build-arg PYTHON_IMAGE=...).
#
# Other settings (environment):
#   BUILD_CA         a CA bundle pip verifies with during the build, passed as the BuildKit secret `build-ca`
#                    (never written to a layer); default the host's system bundle, which holds the CA of a
#                    TLS-intercepting proxy where there is one. BUILD_CA= (empty) passes none.
#   TORCH_INDEX_URL  where torch comes from (https://download.pytorch.org/whl/cpu, the CPU build). When that
#                    index cannot be reached, the CPU wheel is fetched with the host's pip (its own index and
#                    find-links) into wheels/, and the build takes torch from there and the rest from PyPI.
#   TORCH_VERSION    2.13.0
#   DOCKER           the docker client; default one that builds with BuildKit (`docker` with buildx, or
#                    Docker 20.10's client, whose BuildKit is built in)
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE="${IMAGE:-probe-router:local}"
PYTHON_IMAGE="${PYTHON_IMAGE:-python:3.11-slim}"
LOCAL_BASE="${LOCAL_BASE:-probe-router-base:bookworm}"
PROMETHEUS_IMAGE="${PROMETHEUS_IMAGE:-prom/prometheus:v3.5.0}"
LOCAL_PROMETHEUS="${LOCAL_PROMETHEUS:-probe-router-prometheus:bookworm}"
SUITE="${SUITE:-bookworm}"  # Debian 12: its python3 is 3.11, like python:3.11-slim
BUILD_CA="${BUILD_CA-/etc/ssl/certs/ca-certificates.crt}"
TORCH_INDEX_URL="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"

say() { echo "build_image: $*" >&2; }
die() { say "$*"; exit 1; }

# A client that builds with BuildKit: Docker 23+ needs the buildx plugin for it, 20.10 has it built in.
pick_docker() {
    if [[ -n "${DOCKER:-}" ]]; then echo "$DOCKER"; return; fi
    if docker buildx version >/dev/null 2>&1; then echo docker; return; fi
    local client major
    for client in docker /usr/bin/docker; do
        major="$("$client" version --format '{{.Client.Version}}' 2>/dev/null | cut -d. -f1)" || continue
        if [[ "$major" =~ ^[0-9]+$ ]] && ((major < 23)); then echo "$client"; return; fi
    done
    die "no docker client here builds with BuildKit: install the buildx plugin, or Debian's docker.io (20.10)"
}
DOCKER="$(pick_docker)"
"$DOCKER" info >/dev/null 2>&1 || die "no Docker engine answers (start it: sudo dockerd, see README's Deploy)"

present_or_pulled() {
    "$DOCKER" image inspect "$1" >/dev/null 2>&1 && return 0
    say "pulling $1"
    timeout 600 "$DOCKER" pull -q "$1" >/dev/null 2>&1
}

# mmdebstrap SUITE + packages, imported as TAG with the given Dockerfile-style changes; skipped when TAG exists.
debian_image() {
    local tag="$1" include="$2" hook="$3"; shift 3
    "$DOCKER" image inspect "$tag" >/dev/null 2>&1 && return 0
    command -v mmdebstrap >/dev/null || die "mmdebstrap is missing: apt-get install -y mmdebstrap"
    say "building $tag from Debian $SUITE packages ($include)"
    local changes=() change
    for change in "$@"; do changes+=(--change "$change"); done
    mmdebstrap --quiet --variant=minbase --include="$include" \
        --aptopt='APT::Install-Recommends "false"' \
        --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
        --customize-hook="$hook" \
        "$SUITE" - | "$DOCKER" import "${changes[@]}" - "$tag" >/dev/null
}

build_gateway() {
    local base="$PYTHON_IMAGE"
    if ! present_or_pulled "$PYTHON_IMAGE"; then
        say "$PYTHON_IMAGE cannot be pulled: using $LOCAL_BASE instead"
        debian_image "$LOCAL_BASE" ca-certificates,python3,python3-venv,passwd true \
            'ENV LANG=C.UTF-8' 'CMD ["python3"]'
        base="$LOCAL_BASE"
    fi

    local torch_index="$TORCH_INDEX_URL" torch_version="$TORCH_VERSION" wheel
    fetched=""
    placed=()
    if ! curl -fsS --max-time 20 -o /dev/null "${TORCH_INDEX_URL%/}/torch/"; then
        # The CPU wheel from the host pip's own sources; the build takes the rest (torch's too) from PyPI.
        say "$TORCH_INDEX_URL cannot be reached: fetching torch==$TORCH_VERSION+cpu with the host's pip into wheels/"
        local pip=(pip3)
        [[ -x .venv/bin/pip ]] && pip=(.venv/bin/pip)
        fetched="$(mktemp -d)"
        trap 'rm -rf "$fetched"' EXIT
        "${pip[@]}" download -q --no-deps --only-binary=:all: --python-version 3.11 \
            --platform "manylinux_2_28_$(uname -m)" --dest "$fetched" "torch==$TORCH_VERSION+cpu" \
            || die "no CPU wheel of torch $TORCH_VERSION: put one in wheels/ or set TORCH_INDEX_URL"
        # Into wheels/ (pip's --find-links reads its top level) for this build only, unless it was there already.
        for wheel in "$fetched"/*.whl; do
            [[ -e "wheels/$(basename "$wheel")" ]] && continue
            cp "$wheel" wheels/ && placed+=("wheels/$(basename "$wheel")")
        done
        trap 'rm -rf "$fetched" "${placed[@]}"' EXIT
        torch_index=https://pypi.org/simple
        torch_version="$TORCH_VERSION+cpu"
    fi

    local secret=()
    if [[ -n "$BUILD_CA" ]]; then
        [[ -s "$BUILD_CA" ]] || die "BUILD_CA=$BUILD_CA is not a file (BUILD_CA= passes none)"
        secret=(--secret "id=build-ca,src=$BUILD_CA")
    fi
    say "building $IMAGE on $base (torch $torch_version from $torch_index)"
    DOCKER_BUILDKIT=1 "$DOCKER" build --progress=plain "${secret[@]}" \
        --build-arg "PYTHON_IMAGE=$base" --build-arg "TORCH_INDEX_URL=$torch_index" \
        --build-arg "TORCH_VERSION=$torch_version" --tag "$IMAGE" .
}

prometheus_image() {
    if present_or_pulled "$PROMETHEUS_IMAGE"; then echo "$PROMETHEUS_IMAGE"; return; fi
    say "$PROMETHEUS_IMAGE cannot be pulled: using $LOCAL_PROMETHEUS (Debian's prometheus) instead"
    # Like prom/prometheus: runs as nobody, keeps its data in /prometheus, and has a wget for health checks.
    debian_image "$LOCAL_PROMETHEUS" prometheus,wget,ca-certificates \
        'mkdir -p "$1/prometheus" && chown 65534:65534 "$1/prometheus"' \
        'USER 65534:65534' 'WORKDIR /prometheus' 'EXPOSE 9090' \
        'ENTRYPOINT ["/usr/bin/prometheus"]' \
        'CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]'
    echo "$LOCAL_PROMETHEUS"
}

case "${1:-gateway}" in
    gateway) build_gateway ;;
    prometheus) prometheus_image ;;
    *) die "usage: $0 [gateway|prometheus]" ;;
esac
