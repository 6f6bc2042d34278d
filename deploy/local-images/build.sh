#!/usr/bin/env bash
# Build every image of the stack on a machine that reaches no image registry (PyPI and Debian only).
#
#   deploy/local-images/build.sh              # bases, then the gateway, trainer and vLLM-CPU images
#   deploy/local-images/build.sh bases        # only the local stand-ins for the base images
#   deploy/local-images/build.sh gateway      # bases if missing, then one image (or trainer, vllm-cpu)
#
# The Dockerfiles and docker-compose.yml name official images (python:3.11-slim-bookworm,
# prom/prometheus) and stay that way for users. Where none can be pulled, this script builds
# stand-ins from Debian packages (mmdebstrap into a root filesystem, then `docker import`):
#   dro-local/python:3.11-bookworm      Debian's Python 3.11 with venv and pip, for PYTHON_IMAGE
#   dro-local/prometheus:bookworm       Debian's Prometheus, for PROMETHEUS_IMAGE in compose
# then builds the project's images FROM them with `docker build --build-arg PYTHON_IMAGE=...`.
#
# This machine's own network quirks stay in the stand-ins and in this script, never in the
# Dockerfiles: package traffic passes an intercepting proxy whose CA is in this host's bundle
# (copied into the stand-in and named by PIP_CERT), and PyTorch's CPU wheel lies in a local folder
# (WHEELS, served to the builds on loopback) instead of PyTorch's index, which is unreachable here.
# Grafana has no Debian package: no stand-in, so its container does not run on such a machine.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON_BASE="${PYTHON_BASE:-dro-local/python:3.11-bookworm}"
PROMETHEUS_BASE="${PROMETHEUS_BASE:-dro-local/prometheus:bookworm}"
SUITE="${SUITE:-bookworm}"
HOST_CA="${HOST_CA:-/etc/ssl/certs/ca-certificates.crt}"
WHEELS="${WHEELS:-/opt/wheels}"
WHEEL_PORT="${WHEEL_PORT:-8799}"
WHAT="${1:-all}"

log() { printf '[build] %s\n' "$*" >&2; }

have_image() { docker image inspect "$1" >/dev/null 2>&1; }

build_bases() {
    command -v mmdebstrap >/dev/null || { log "mmdebstrap missing: apt-get install mmdebstrap"; exit 1; }
    local work
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' RETURN
    if ! have_image "$PYTHON_BASE"; then
        log "stand-in $PYTHON_BASE from Debian $SUITE"
        mmdebstrap --quiet --variant=minbase \
            --include=python3,python3-venv,python3-pip,python-is-python3,ca-certificates \
            --customize-hook="cp '$HOST_CA' \"\$1/etc/ssl/host-ca-bundle.crt\"" \
            --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
            "$SUITE" "$work/python.tar"
        docker import \
            --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            --change 'ENV LANG=C.UTF-8' \
            --change 'ENV PIP_CERT=/etc/ssl/host-ca-bundle.crt' \
            --change 'ENV SSL_CERT_FILE=/etc/ssl/host-ca-bundle.crt' \
            --change 'CMD ["python3"]' \
            "$work/python.tar" "$PYTHON_BASE" >/dev/null
    fi
    if ! have_image "$PROMETHEUS_BASE"; then
        log "stand-in $PROMETHEUS_BASE from Debian $SUITE"
        # Laid out as the official image: the binary on PATH, data in /prometheus, user nobody.
        mmdebstrap --quiet --variant=minbase --include=prometheus \
            --customize-hook='mkdir -p "$1/prometheus" && chown 65534:65534 "$1/prometheus"' \
            --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
            "$SUITE" "$work/prometheus.tar"
        docker import \
            --change 'USER 65534:65534' \
            --change 'WORKDIR /prometheus' \
            --change 'EXPOSE 9090' \
            --change 'ENTRYPOINT ["/usr/bin/prometheus"]' \
            --change 'CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]' \
            "$work/prometheus.tar" "$PROMETHEUS_BASE" >/dev/null
    fi
}

# PyTorch's CPU wheel from the local folder, on loopback, for the builds that need torch
# (vLLM's CPU build and the trainer); they run with --network host to reach it.
serve_wheels() {
    [ -d "$WHEELS" ] || { log "no local wheel folder $WHEELS: builds take torch from PyTorch's index"; return; }
    python3 -m http.server "$WHEEL_PORT" --bind 127.0.0.1 --directory "$WHEELS" >/dev/null 2>&1 &
    WHEEL_SERVER=$!
    trap 'kill "$WHEEL_SERVER" 2>/dev/null || true' EXIT
    for _ in $(seq 50); do
        python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$WHEEL_PORT/')" 2>/dev/null && return
        sleep 0.1
    done
    log "the wheel server did not start"; exit 1
}

# docker build with the stand-in base; the classic builder, because BuildKit needs the buildx
# plugin on Docker's newer clients and its `# syntax=` line would fetch a frontend from a registry.
build() {
    local torch_args=()
    if [ -n "${WHEEL_SERVER:-}" ]; then
        torch_args=(--build-arg "TORCH_FIND_LINKS=http://127.0.0.1:$WHEEL_PORT/"
                    --build-arg "TORCH_INDEX_URL=https://pypi.org/simple")
    fi
    (cd "$ROOT" && DOCKER_BUILDKIT=0 docker build --network host --build-arg "PYTHON_IMAGE=$PYTHON_BASE" \
        "${torch_args[@]}" "$@" .)
}

build_gateway() { log "gateway image dro-gateway:local"; build -t dro-gateway:local; }
build_trainer() { log "trainer image dro-trainer:local"; build -f Dockerfile.trainer -t dro-trainer:local; }
build_vllm_cpu() { log "vLLM CPU image dro-vllm-cpu:0.32.0"; build -f Dockerfile.vllm-cpu -t dro-vllm-cpu:0.32.0; }

case "$WHAT" in
    bases) build_bases ;;
    gateway) build_bases; build_gateway ;;
    trainer) build_bases; serve_wheels; build_trainer ;;
    vllm-cpu) build_bases; serve_wheels; build_vllm_cpu ;;
    all) build_bases; build_gateway; serve_wheels; build_trainer; build_vllm_cpu ;;
    *) log "usage: $0 [all|bases|gateway|trainer|vllm-cpu]"; exit 2 ;;
esac
