"""`python -m trainer <stage>` (console script `dro-trainer`): parse and validate the config, call the stages.

Stages: label, extract, fit, optimize, export; `all` (alias `run`) chains them, each resuming from
its outputs in the run directory. `import-released` wraps a soft prompt released by the DRO authors
into the artifact format for a model the user names; `convert-artifact` brings an artifact of an
earlier format (1: no serving payloads) to the current one, in place. Errors are mapped to one-line messages and
exit code 2 here, in one place.

Examples:
  python -m trainer all --model-dir MODEL --run-dir runs/x --set label.vllm_url=http://127.0.0.1:8000 \
      --set label.served_model_name=smollm2 --set label.num_samples=4
  python -m trainer fit --run-dir runs/x --force
  python -m trainer import-released --file type.all_length.default.safetensors --model-dir MODEL \
      --name dro-paper --out artifacts/x
  python -m trainer convert-artifact --artifact artifacts/old/dro
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml
from pydantic import ValidationError

STAGE_CHOICES = ("label", "extract", "fit", "optimize", "export", "all", "run", "import-released", "convert-artifact")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dro-trainer", description="DRO soft-prompt trainer")
    parser.add_argument("stage", choices=STAGE_CHOICES)
    parser.add_argument("--config", type=Path, help="YAML/JSON RunConfig (default: <run-dir>/config.json if present)")
    parser.add_argument("--model-dir", help="HF model folder, or a packaged model: 'qwen' (Qwen2.5-Coder-0.5B-Instruct) "
                        "or 'smollm2' (SmolLM2-135M-Instruct), prepared on first use")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"),
                        help="where extract and optimize run (default: the config's, auto = cuda when available)")
    parser.add_argument("--run-dir", type=Path)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. label.num_samples=4 (value parsed as YAML)")
    parser.add_argument("--force", action="store_true", help="fit past a failed label-balance check (marks the artifact)")
    parser.add_argument("--no-progress", action="store_true")
    # import-released
    parser.add_argument("--file", type=Path, help="released .safetensors (import-released)")
    parser.add_argument("--name", default="dro-paper", help="variant name (import-released)")
    parser.add_argument("--base-model", help="model name recorded in the manifest (import-released)")
    parser.add_argument("--init-prompt", choices=("default", "short", "mistral"), help="(import-released)")
    parser.add_argument("--out", type=Path, help="artifact directory (import-released)")
    parser.add_argument("--artifact", type=Path, help="artifact directory to convert in place (convert-artifact)")
    return parser.parse_args(argv)


def resolve_model_dir(value: str) -> str:
    from safeprompt.models import resolve_model

    return str(resolve_model(value))


def set_path(data: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        data = data.setdefault(k, {})
    data[keys[-1]] = value


def build_config(args: argparse.Namespace):
    from trainer.config import RunConfig

    data: dict = {}
    source = args.config
    if source is None and args.run_dir is not None and (args.run_dir / "config.json").is_file():
        source = args.run_dir / "config.json"
    if source is not None:
        data = yaml.safe_load(Path(source).read_text()) or {}
    if args.model_dir:
        data["model_dir"] = resolve_model_dir(args.model_dir)
    if args.run_dir:
        data["run_dir"] = str(args.run_dir)
    for item in args.set:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        set_path(data, key, yaml.safe_load(value))
    if args.force:
        set_path(data, "fit.force", True)
    if args.device:
        data["device"] = args.device
    return RunConfig.model_validate(data)


def run_stages(stage: str, config, show_progress: bool) -> None:
    from trainer import pipeline, store
    from trainer.report import print_summary

    if config.torch_threads:
        import torch

        torch.set_num_threads(config.torch_threads)
    config.run_dir.mkdir(parents=True, exist_ok=True)
    store.write_json(config.run_dir / "config.json", config.model_dump(mode="json"))
    chosen = pipeline.STAGES if stage in ("all", "run") else (stage,)
    if "optimize" in chosen and not pipeline.stage_is_done(config, "optimize"):
        pipeline.check_optimize_batches(config)  # before the label stage's minutes or hours, not after
    for name in chosen:
        print(f"[trainer] {name}: {'done earlier, skipped' if pipeline.stage_is_done(config, name) else 'running'}",
              file=sys.stderr)
        pipeline.STAGE_RUNNERS[name](config, show_progress=show_progress)
    print_summary(config.run_dir, sys.stdout)


def import_released_command(args: argparse.Namespace) -> None:
    from safeprompt.artifact import read_model_info
    from safeprompt.artifact_write import import_released, save_artifact

    if not (args.file and args.model_dir and args.out):
        raise ValueError("import-released needs --file, --model-dir and --out")
    model_dir = resolve_model_dir(args.model_dir)
    info = read_model_info(model_dir)
    manifest, tensors = import_released(args.file, name=args.name, base_model=args.base_model or info.name,
                                        model=info, init_prompt=args.init_prompt)
    print(save_artifact(args.out, manifest, tensors))


def convert_artifact_command(args: argparse.Namespace) -> None:
    from safeprompt.artifact_write import convert_artifact

    if not args.artifact:
        raise ValueError("convert-artifact needs --artifact DIR")
    print(convert_artifact(args.artifact))


def main(argv: list[str] | None = None) -> int:
    from safeprompt.artifact import ArtifactError
    from trainer.chat import ChatTemplateError
    from trainer.data import QueryFileError
    from safeprompt.client import ChatRequestError
    from trainer.pipeline import LabelBalanceError

    args = parse_args(argv)
    try:
        if args.stage == "import-released":
            import_released_command(args)
        elif args.stage == "convert-artifact":
            convert_artifact_command(args)
        else:
            run_stages(args.stage, build_config(args), not args.no_progress)
    except ValidationError as exc:
        print(f"error: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    except (QueryFileError, ChatTemplateError, LabelBalanceError, ArtifactError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ChatRequestError as exc:  # the label stage's vLLM server failed or went away
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
