"""`dro-eval` / `python -m evaluation`: parse the command line into an EvalConfig and run it.

Flags map one to one onto EvalConfig fields (`--top-p` -> `top_p`); the defaults live in EvalConfig.

Example (through the gateway, greedy, the paper's first 100 AdvBench queries and JBB benign):
    dro-eval --base-url http://127.0.0.1:8000 --model smollm2-135m-instruct \\
        --variants none,default,short,mistral,dro --sets advbench,jbb_benign --run-dir runs/smollm2
Rerunning the same command resumes from the run directory's cache.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from pydantic import SecretStr, ValidationError

from safeprompt.client import ChatRequestError
from safeprompt.judge.model_judge import ModelJudgeSettings
from safeprompt.sampling import PAPER_NUM_KEEP, PAPER_NUM_SAMPLES

from evaluation.cache import CacheError
from evaluation.config import ConfigError, EvalConfig, GuardSettings
from evaluation.querysets import BUILTIN_SETS, QuerySetError
from evaluation.targets import TargetError


def _csv(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _artifact(value: str) -> tuple[str, Path]:
    name, separator, path = value.partition("=")
    if not separator or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {value!r}")
    return name, Path(path)


def build_parser() -> argparse.ArgumentParser:
    """The command line. Flags have no defaults of their own: a flag not given is left out, and
    EvalConfig's default (the paper's, for sampling) applies."""
    parser = argparse.ArgumentParser(
        prog="dro-eval", description="Evaluate safety-prompt variants of a served chat model.",
        argument_default=argparse.SUPPRESS,
        epilog="Built-in sets: " + "; ".join(f"{name} ({spec.kind}): {spec.description}"
                                             for name, spec in BUILTIN_SETS.items()))
    target = parser.add_argument_group("target")
    target.add_argument("--base-url", required=True, help="gateway (or vLLM with --mode direct) URL")
    target.add_argument("--model", required=True, help="model name as served (without @variant)")
    target.add_argument("--mode", choices=("gateway", "direct"))
    target.add_argument("--variants", type=_csv,
                        help="comma-separated variants; 'all' = every MODEL@VARIANT the gateway lists")
    target.add_argument("--artifact", type=_artifact, action="append", metavar="NAME=PATH",
                        help="direct mode: a soft-prompt artifact directory served as variant NAME")
    target.add_argument("--api-key-env", help="environment variable holding the API key")
    data = parser.add_argument_group("query sets")
    data.add_argument("--sets", type=_csv)
    data.add_argument("--custom-set", action="append", metavar="NAME:KIND:PATH[:COLUMN]",
                      help="your own set: KIND harmful|harmless; .txt (a query per line), .csv or .jsonl "
                           "(query column/key 'query' unless COLUMN given)")
    data.add_argument("--limit", type=int, help="first N queries of each set")
    data.add_argument("--data-dir", type=Path)
    gen = parser.add_argument_group("generation")
    gen.add_argument("--no-greedy", dest="greedy", action="store_false", help="skip the greedy answer")
    gen.add_argument("--samples", type=int, help=f"sampled answers per query (paper: {PAPER_NUM_SAMPLES})")
    gen.add_argument("--keep", type=int, help=f"paper metric keeps the N longest (paper: {PAPER_NUM_KEEP})")
    gen.add_argument("--temperature", type=float)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--min-tokens", type=int)
    gen.add_argument("--max-tokens-harmful", type=int)
    gen.add_argument("--max-tokens-harmless", type=int)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--full-greedy-answers", dest="stop_greedy_when_judged", action="store_false",
                     help="generate greedy answers to max tokens instead of stopping once the refusal "
                          "judges' windows are closed (the verdicts are the same either way)")
    judging = parser.add_argument_group("judges")
    judging.add_argument("--judge", help="refusal judge (default: safeprompt.judge.DEFAULT_JUDGE)")
    judging.add_argument("--guard-url", help="OpenAI-compatible URL of a Llama-Guard-style model")
    judging.add_argument("--guard-model")
    judging.add_argument("--guard-api-key-env")
    judging.add_argument("--model-judge-url", help="OpenAI-compatible URL of a refusal judge model: every answer "
                         "is also judged by it, in a second report (implies --full-greedy-answers)")
    judging.add_argument("--model-judge-model", help="its served model name")
    judging.add_argument("--model-judge-format", choices=["ask", "wildguard"],
                         help="ask: any chat model, asked Yes/No (default); wildguard: allenai/wildguard's prompt")
    judging.add_argument("--model-judge-threshold", type=float, help="ask: P(refusal) from which it is one (0.5)")
    judging.add_argument("--model-judge-no-constrain", dest="model_judge_constrain", action="store_false",
                         default=None, help="ask: do not force Yes/No with vLLM's structured outputs "
                                            "(for servers that are not vLLM)")
    judging.add_argument("--model-judge-api-key-env")
    run = parser.add_argument_group("run")
    run.add_argument("--run-dir", type=Path, required=True, help="results and resumable cache")
    run.add_argument("--concurrency", type=int)
    run.add_argument("--timeout-s", type=float)
    run.add_argument("--max-requests", type=int, help="stop after N new requests")
    run.add_argument("--no-chart", dest="chart", action="store_false")
    return parser


def _secret(env_name: str) -> str:
    value = os.environ.get(env_name)
    if not value:
        raise ConfigError(f"environment variable {env_name} is not set")
    return value


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    """Build the config from the flags given; pydantic checks the values and their combinations."""
    fields = vars(args).copy()
    guard_url, guard_model = fields.pop("guard_url", None), fields.pop("guard_model", None)
    guard_key_env = fields.pop("guard_api_key_env", None)
    if (guard_url is None) != (guard_model is None):
        raise ConfigError("--guard-url and --guard-model go together")
    if guard_url is not None:
        fields["guard"] = (GuardSettings(guard_url, guard_model, SecretStr(_secret(guard_key_env))) if guard_key_env
                           else GuardSettings(guard_url, guard_model))
    judge_fields = {name: fields.pop(f"model_judge_{name}", None)
                    for name in ("url", "model", "format", "threshold", "constrain", "api_key_env")}
    if (judge_fields["url"] is None) != (judge_fields["model"] is None):
        raise ConfigError("--model-judge-url and --model-judge-model go together")
    if judge_fields["url"] is not None:
        options = {name: judge_fields[name] for name in ("format", "threshold", "constrain")
                   if judge_fields[name] is not None}
        if judge_fields["api_key_env"]:
            options["api_key"] = _secret(judge_fields["api_key_env"])
        try:
            fields["model_judge"] = ModelJudgeSettings(base_url=judge_fields["url"], model=judge_fields["model"],
                                                       **options)
        except ValidationError as exc:
            raise ConfigError(describe_validation_error(exc, flag_prefix="--model-judge-")) from None
        if fields.get("greedy", True):  # the judge model reads whole answers (no fingerprint change without greedy)
            fields.setdefault("stop_greedy_when_judged", False)
    elif any(value is not None for value in judge_fields.values()):
        raise ConfigError("--model-judge-* options need --model-judge-url and --model-judge-model")
    if "api_key_env" in fields:
        fields["api_key"] = _secret(fields.pop("api_key_env"))
    if "artifact" in fields:
        pairs = fields.pop("artifact")
        fields["artifacts"] = dict(pairs)
        if len(fields["artifacts"]) != len(pairs):
            raise ConfigError("an --artifact name is given twice")
    if "custom_set" in fields:
        fields["custom_sets"] = tuple(fields.pop("custom_set"))
    return EvalConfig(**fields)


def describe_validation_error(error: ValidationError, flag_prefix: str = "--") -> str:
    """One line per problem, named by its flag (`--top-p: ...`), not pydantic's report."""
    problems = []
    for item in error.errors():
        flag = (flag_prefix + "-".join(str(part) for part in item["loc"]).replace("_", "-")) if item["loc"] else ""
        message = item["msg"].removeprefix("Value error, ")
        problems.append(f"{flag}: {message}" if flag else message)
    return "; ".join(problems)


def main(argv: list[str] | None = None) -> int:
    from evaluation.harness import evaluate
    from evaluation.report import render_markdown

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    command = shlex.join(["dro-eval", *argv])
    try:
        config = config_from_args(args)
        print(f"command: {command}\nseed: {config.seed}", file=sys.stderr)
        result = evaluate(config, command)
    except ValidationError as exc:
        print(f"dro-eval: error: {describe_validation_error(exc)}", file=sys.stderr)
        return 2
    except (ConfigError, QuerySetError, TargetError, CacheError, ChatRequestError, ValueError) as exc:
        print(f"dro-eval: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dro-eval: interrupted; every finished request is cached: rerun the same command to resume",
              file=sys.stderr, flush=True)
        # Exit now: a normal exit would join the worker threads, i.e. wait for requests in flight.
        os._exit(130)
    print(render_markdown(result.report))
    if result.model_report is not None:
        print(render_markdown(result.model_report))
    model_paths = {f"model judge {kind}": path for kind, path in (result.model_paths or {}).items()}
    for kind, path in {**result.paths, **model_paths}.items():
        print(f"{kind}: {path}", file=sys.stderr)
    if not result.finished:
        print("dro-eval: run not finished (stopped early or answers missing); rerun the same command to resume",
              file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
