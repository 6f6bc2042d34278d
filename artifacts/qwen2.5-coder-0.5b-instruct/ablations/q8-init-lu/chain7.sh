#!/bin/bash
# Session 7: init-prompt and L_U ablations on the q8 (8-sample) labels, then one held-out eval of all three.
cd /work/main
T=".venv/bin/python -m trainer all"
run() { echo "=== $(date +%T) $*"; "$@"; echo "=== $(date +%T) rc=$?"; }
mk() { [ -d "$1" ] || PYTHONPATH=. .venv/bin/python bench/rejudge_labels.py runs/q8 "$1" --judge phrases "${@:2}"; }
mk runs/q8-initshort && run $T --run-dir runs/q8-initshort --set optimize.init_prompt=short --set export.artifact_dir=runs/q8-initshort/artifact
mk runs/q8-lu001 && run $T --run-dir runs/q8-lu001 --set optimize.weight_off_subspace=0.001 --set export.artifact_dir=runs/q8-lu001/artifact
mk runs/q8-initdef && run $T --run-dir runs/q8-initdef --set optimize.init_prompt=default --set export.artifact_dir=runs/q8-initdef/artifact
echo "=== $(date +%T) starting vLLM"
.venv/bin/python -m stack.vllm --model qwen --port 8001 > runs/vllm7.log 2>&1 &
V=$!
for i in $(seq 1 60); do curl -sf http://127.0.0.1:8001/v1/models >/dev/null && break; sleep 5; done
run runs/eval-new.sh initshort=runs/q8-initshort lu001=runs/q8-lu001 initdef=runs/q8-initdef
kill -HUP $V; wait $V
echo "=== $(date +%T) chain7 done"
