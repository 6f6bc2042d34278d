"""`make serve`: the stack natively on CPU, by default on Qwen2.5-Coder-0.5B-Instruct.

Checks both ports first (one held by another process is an error, exit 2, that names the holder),
prepares the model (an embedded one, `qwen` or `smollm2`, is converted once by safeprompt.models;
or a local folder), starts vLLM's CPU build on 127.0.0.1:VLLM_PORT with prompt embeds enabled,
then the gateway on HOST:PORT with the text variants (none, default, short, mistral), the model's
committed DRO artifact (`artifacts/<public id>/dro`, when trained) and any `--artifact` given;
waits until both are ready, prints how to call it, and stops everything on Ctrl-C, SIGTERM or
SIGHUP, however often they arrive. Artifacts are validated by the gateway at start-up.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml
from pydantic import ValidationError

from gateway.settings import RESERVED_VARIANTS, ModelConfig

from stack.ports import PortInUseError, ensure_port_free
from stack.processes import REPO_ROOT, StopSignals, connect_host, start_gateway, start_vllm, supervise
from stack.vllm import EMBEDDED_MODELS, READY_TIMEOUT_S, STOP_TIMEOUT_S, prepare_model, public_name

DEFAULT_MODEL = "qwen"
MODEL_NAME = EMBEDDED_MODELS[DEFAULT_MODEL]


def committed_artifacts(model_name: str, *, allow_forced: bool = False) -> dict[str, str]:
    """The trained DRO artifact committed for a model's public id, when there is one.

    An artifact marked `forced` (trained past a failed label-balance check) is left out unless
    `allow_forced`: the gateway would refuse it anyway (models[].allow_forced_artifacts).
    """
    folder = REPO_ROOT / "artifacts" / model_name / "dro"
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        return {}
    if json.loads(manifest.read_text()).get("forced") and not allow_forced:
        print(f"note: {folder} is marked forced (its labels could not support a refusal direction); not served. "
              "Pass --allow-forced dro to serve it anyway.", file=sys.stderr)
        return {}
    return {"dro": str(folder)}


# vLLM --dtype values -> the gateway's models[].embeds_dtype (the dtype soft prompts are sent in).
EMBEDS_DTYPE_FOR_VLLM = {"auto": "auto", "bfloat16": "bfloat16", "half": "float16", "float16": "float16",
                         "float": "float32", "float32": "float32"}


def gateway_config(model: str | Path, name: str, vllm_port: int, *, with_dro: bool = False,
                   artifacts: dict[str, str] | None = None, default_variant: str | None = None,
                   allow_forced: tuple[str, ...] = (), vllm_dtype: str | None = None) -> dict:
    """Gateway settings for one model served by vLLM as `name`.

    `with_dro` adds the committed DRO artifact of `name` (see committed_artifacts), which becomes
    the default variant unless `default_variant` says otherwise; `artifacts` (variant -> folder)
    are added or override it. A local model folder is given as model_path so that artifacts are
    validated against it. `allow_forced` names the artifact variants served although marked forced.
    `vllm_dtype` (vLLM's --dtype, when given) tells the gateway the dtype to send soft prompts in.
    """
    committed = committed_artifacts(name, allow_forced="dro" in allow_forced) if with_dro else {}
    served = {**committed, **(artifacts or {})}
    return {
        "upstream_urls": [f"http://127.0.0.1:{vllm_port}"],
        "models": [{
            "name": name,
            "upstream_model": name,
            "model_path": str(model) if Path(model).is_dir() else None,
            "default_variant": default_variant or ("dro" if committed else "default"),
            "artifacts": served,
            **({"allow_forced_artifacts": [v for v in allow_forced if v in served]} if allow_forced else {}),
            **({"embeds_dtype": EMBEDS_DTYPE_FOR_VLLM[vllm_dtype]} if vllm_dtype else {}),
        }],
    }


def usage(host: str, port: int, vllm_port: int, model_ids: list[str]) -> str:
    base = f"http://{connect_host(host)}:{port}"
    return f"""
The gateway is ready on {base} (listening on {host}:{port}; vLLM CPU on 127.0.0.1:{vllm_port}, loopback only).
Models: {', '.join(model_ids)}

  python - <<'PY'
  from openai import OpenAI
  client = OpenAI(base_url="{base}/v1", api_key="unused")
  reply = client.chat.completions.create(model="{model_ids[0]}",
      messages=[{{"role": "user", "content": "How do I bake bread?"}}], max_tokens=64)
  print(reply.choices[0].message.content)
  PY

  curl -s {base}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "{model_ids[0]}", "messages": [{{"role": "user", "content": "How do I bake bread?"}}], "max_tokens": 64}}'

Metrics: {base}/metrics   Ctrl-C stops everything.
"""


def parse_artifact(value: str) -> tuple[str, str]:
    name, sep, folder = value.partition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {value!r}")
    return name, str(Path(folder).expanduser().resolve())


def check_config(config: dict) -> str | None:
    """What is wrong with the model entry before anything starts (names, folders), else None.
    The artifacts' contents are checked against the model by the gateway at its start-up."""
    try:
        ModelConfig(**config["models"][0])
    except ValidationError as exc:
        return str(exc)
    for variant, folder in config["models"][0]["artifacts"].items():
        if not (Path(folder) / "manifest.json").is_file():
            return f"artifact {variant}={folder}: no manifest.json there (not an artifact folder)"
    return None


def main(argv: list[str] | None = None) -> int:
    signals = StopSignals().install()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8000, help="the gateway's port")
    parser.add_argument("--host", default="0.0.0.0", help="the gateway's address")
    parser.add_argument("--vllm-port", type=int, default=8001, help="vLLM's port (always on 127.0.0.1)")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"an embedded model ({', '.join(EMBEDDED_MODELS)}) or a local Hugging Face chat-model "
                        f"folder (default: {DEFAULT_MODEL})")
    parser.add_argument("--name", default=None,
                        help="public model id the gateway serves it as (default: the embedded model's; "
                        "required for a folder)")
    parser.add_argument("--dtype", default=None, choices=sorted(EMBEDS_DTYPE_FOR_VLLM),
                        help="vLLM --dtype (default: the checkpoint's)")
    parser.add_argument("--artifact", action="append", type=parse_artifact, default=[], metavar="NAME=DIR",
                        help="serve a trained artifact folder as variant NAME (repeatable)")
    parser.add_argument("--allow-forced", action="append", default=[], metavar="NAME",
                        help="serve artifact variant NAME even though it is marked forced (trained past a failed "
                        "label-balance check); the gateway refuses such artifacts otherwise")
    parser.add_argument("--default-variant", default=None,
                        help="variant for the bare model id (default: dro when the committed one is served, "
                        "else default)")
    parser.add_argument("--run-dir", type=Path, default=REPO_ROOT / "runs" / "serve",
                        help="where the logs and the gateway's config go")
    args = parser.parse_args(argv)
    embedded = public_name(args.model)
    name = args.name or embedded
    if name is None:
        parser.error("--name is required with a model folder")
    if args.port == args.vllm_port:
        parser.error("--port and --vllm-port must differ")
    committed = committed_artifacts(embedded, allow_forced="dro" in args.allow_forced) if embedded else {}

    def config_for(model_dir: Path) -> dict:
        # The committed artifact belongs to the embedded model, whatever id it is served as.
        return gateway_config(model_dir, name, args.vllm_port, artifacts={**committed, **dict(args.artifact)},
                              default_variant=args.default_variant or ("dro" if committed else None),
                              allow_forced=tuple(args.allow_forced), vllm_dtype=args.dtype)

    problem = check_config(config_for(Path(args.model)))
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        ensure_port_free(args.vllm_port, "127.0.0.1")
        ensure_port_free(args.port, args.host)
    except PortInUseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    run_dir = args.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)

    def start(servers: list) -> None:
        model_dir = prepare_model(args.model)
        config = config_for(model_dir)
        print(f"Starting vLLM (CPU) on 127.0.0.1:{args.vllm_port}; log: {run_dir / 'vllm.log'}", flush=True)
        servers.append(start_vllm(model_dir, served_model_name=name, port=args.vllm_port, dtype=args.dtype,
                                  log_path=run_dir / "vllm.log", timeout_s=READY_TIMEOUT_S))
        config_path = run_dir / "gateway.yaml"
        config_path.write_text(yaml.safe_dump(config))
        print(f"Starting the gateway on {args.host}:{args.port}; log: {run_dir / 'gateway.log'}", flush=True)
        servers.append(start_gateway(config_path, port=args.port, host=args.host, log_path=run_dir / "gateway.log"))
        variants = [*RESERVED_VARIANTS, *config["models"][0]["artifacts"]]
        print(usage(args.host, args.port, args.vllm_port, [name, *(f"{name}@{v}" for v in variants)]), flush=True)

    return supervise(start, signals, stop_timeout_s=STOP_TIMEOUT_S,
                     exit_note=f"A server exited; see the logs in {run_dir}.", stop_note="Stopping...")

if __name__ == "__main__":
    sys.exit(main())
