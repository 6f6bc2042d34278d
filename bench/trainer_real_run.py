"""The real DRO run for SmolLM2-135M-Instruct on this machine: start a vLLM CPU server on the model
(through `stack.processes.start_vllm`), run `python -m trainer` stage by stage against it, stop it.

Usage (the committed artifact came from this command; see docs/trainer.md):
  PYTHONPATH=. .venv/bin/python bench/trainer_real_run.py --run-dir runs/smollm2 -- \
      --set label.num_samples=2 --set label.num_keep=2 --set label.stop_when_judged=true ...
Everything after `--` is passed to `python -m trainer all` unchanged. The vLLM server is only
needed for the label stage and is stopped as soon as labels are complete.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from stack.processes import free_port, servers_stopped_on_exit, start_vllm
from safeprompt.models import prepare_smollm2

SERVED_NAME = "smollm2-135m-instruct"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--vllm-dtype", default=None, help="vLLM --dtype (default: vLLM's choice, bf16 on CPU)")
    parser.add_argument("trainer_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    extra = [a for a in args.trainer_args if a != "--"]
    model_dir = prepare_smollm2()
    base = [sys.executable, "-m", "trainer"]
    # The served name is part of the label stage's identity; the URL (a port) is not.
    common = ["--model-dir", str(model_dir), "--run-dir", str(args.run_dir), "--set", f"base_model={SERVED_NAME}",
              "--set", f"label.served_model_name={SERVED_NAME}"]
    if not (args.run_dir / "label.done.json").is_file():
        port = free_port()
        started = time.monotonic()
        with servers_stopped_on_exit() as servers:  # also on SIGTERM/SIGINT/SIGHUP
            servers.append(start_vllm(model_dir, served_model_name=SERVED_NAME, port=port,
                                      log_path=args.run_dir / "vllm.log", dtype=args.vllm_dtype))
            print(f"[real-run] vLLM ready in {time.monotonic() - started:.0f} s on port {port}", flush=True)
            code = subprocess.call(base + ["label"] + common + [
                "--set", f"label.vllm_url=http://127.0.0.1:{port}"] + extra)
        if code != 0:
            return code
    return subprocess.call(base + ["all"] + common + extra)


if __name__ == "__main__":
    sys.exit(main())
