# syntax=docker/dockerfile:1
#
# The gateway image: the OpenAI-compatible gateway only, no torch, no trainer, no build tools; it
# runs as an unprivileged user and is health-checked on /health. (The trainer: Dockerfile.trainer;
# vLLM's CPU build: Dockerfile.vllm-cpu.)
#
#   docker build -t dro-gateway .
#   docker build --build-arg PYTHON_IMAGE=dro-local/python:3.11-bookworm -t dro-gateway .  # no registry
#
# No torch: the trainer writes each soft prompt's vLLM payload into the artifact, and the gateway
# only reads and checks bytes (safeprompt/artifact.py). Dependency layers come from pyproject.toml
# alone, so editing code rebuilds only the last layers.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# ---------------------------------------------------------------------------------------------
# Build stage of the gateway: a virtual environment with the runtime dependencies, then the
# project (gateway package only). Nothing of this stage but /opt/venv reaches the final image.
FROM base AS gateway-build
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml ./
# requirements.txt = [project].dependencies, never the `train` extra (torch and the rest).
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt
COPY README.md ./
COPY safeprompt/ ./safeprompt/
COPY gateway/ ./gateway/
# --no-deps: the dependencies are the layer above. Only safeprompt/ and gateway/ were copied into
# /src, so the installed distribution holds no trainer, evaluation or stack code; the console
# scripts of those packages would point at missing modules, so they are removed. The last command
# imports the installed app (-P: not the sources in the working directory) to prove nothing is
# missing, and that neither the trainer nor torch came along.
RUN pip install --no-cache-dir --no-deps . \
    && rm -f /opt/venv/bin/dro-trainer /opt/venv/bin/dro-eval \
    && python -P -c "import importlib.util as u, gateway.app; assert u.find_spec('trainer') is None and u.find_spec('torch') is None"

# ---------------------------------------------------------------------------------------------
# Gateway image (default target): the virtual environment and nothing else from the build.
FROM base AS gateway
RUN groupadd --system --gid 10001 gateway \
    && useradd --system --no-create-home --uid 10001 --gid 10001 gateway
COPY --from=gateway-build /opt/venv /opt/venv
WORKDIR /app
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["python", "-m", "gateway"]
CMD ["--host", "0.0.0.0", "--port", "8000"]
