"""`python -m stack.vllm` (`make vllm`): vLLM's CPU server alone, with the project's command line.

For the trainer's vLLM label backend, or to try a model without the gateway: starts
`stack.processes.vllm_command` on 127.0.0.1:PORT (loopback only: vLLM trusts prompt embeds) for a
model folder or an embedded model (`qwen`, `smollm2`, prepared on first use by safeprompt.models),
waits until it serves the model, prints its URL, and stops it with its engine processes on Ctrl-C,
SIGTERM or SIGHUP, however often they arrive. vLLM's own log goes to the terminal. The port is
checked first: one held by another process is an error (exit 2) that names it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stack.ports import PortInUseError, ensure_port_free
from stack.processes import StopSignals, start_vllm, supervise
from safeprompt.models import QWEN_NAME

# Public model ids of the embedded models (the names in safeprompt.models.MODELS).
EMBEDDED_MODELS = {"qwen": QWEN_NAME, "smollm2": "smollm2-135m-instruct"}
STOP_TIMEOUT_S = 20.0
READY_TIMEOUT_S = 600.0  # Qwen2.5-Coder-0.5B takes ~60 s on two CPU cores; the first run also compiles kernels


def public_name(model: str) -> str | None:
    """The public id of an embedded model name (`qwen`, `smollm2`); None for a folder or hub id."""
    return EMBEDDED_MODELS.get(model)


def prepare_model(model: str) -> Path:
    """The model folder for `model`: an embedded model prepared on first use, else the value itself."""
    from safeprompt.models import resolve_model

    if public_name(model):
        print(f"Preparing {model} (the first run downloads and converts it once)...", flush=True)
    return resolve_model(model)


def main(argv: list[str] | None = None) -> int:
    signals = StopSignals().install()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen",
                        help=f"an embedded model ({', '.join(EMBEDDED_MODELS)}) or a local Hugging Face folder "
                        "(default: qwen)")
    parser.add_argument("--name", default=None,
                        help="--served-model-name (default: the embedded model's public id; required for a folder)")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--dtype", default=None, help="vLLM --dtype (default: the checkpoint's)")
    parser.add_argument("--max-model-len", type=int, default=2048)
    args = parser.parse_args(argv)
    name = args.name or public_name(args.model)
    if name is None:
        parser.error("--name is required with a model folder")
    try:
        ensure_port_free(args.port, "127.0.0.1")
    except PortInUseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    def start(servers: list) -> None:
        model_dir = prepare_model(args.model)
        print(f"Starting vLLM (CPU) for {model_dir} as {name} on 127.0.0.1:{args.port}", flush=True)
        servers.append(start_vllm(model_dir, served_model_name=name, port=args.port, log_path=None, dtype=args.dtype,
                                  max_model_len=args.max_model_len, timeout_s=READY_TIMEOUT_S))
        print(f"\nvLLM is ready: http://127.0.0.1:{args.port}/v1 serves {name}. Ctrl-C stops it.", flush=True)

    return supervise(start, signals, stop_timeout_s=STOP_TIMEOUT_S, exit_note="vLLM exited.",
                     stop_note="Stopping vLLM...")

if __name__ == "__main__":
    sys.exit(main())
