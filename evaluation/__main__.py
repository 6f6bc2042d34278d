"""`dro-eval` / `python -m evaluation`: parse the command line into an EvalConfig and run it.

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

from evaluation.cache import CacheError
from evaluation.client import EvalRequestError
from evaluation.config import ConfigError, EvalConfig, GuardSettings
from evaluation.querysets import BUILTIN_SETS, DEFAULT_DATA_DIR, QuerySetError
from evaluation.targets import TargetError


def _csv(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _artifact(value: str) -> tuple[str, Path]:
    name, separator, path = value.partition("=")
    if not separator or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {value!r}")
    return name, Path(path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dro-eval", description="Evaluate safety-prompt variants of a served chat model.",
        epilog="Built-in sets: " + "; ".join(f"{name} ({spec.kind}): {spec.description}"
                                             for name, spec in BUILTIN_SETS.items()))
    target = parser.add_argument_group("target")
    target.add_argument("--base-url", required=True, help="gateway (or vLLM with --mode direct) URL")
    target.add_argument("--model", required=True, help="model name as served (without @variant)")
    target.add_argument("--mode", choices=("gateway", "direct"), default="gateway")
    target.add_argument("--variants", type=_csv, default=("all",),
                        help="comma-separated variants; 'all' = every MODEL@VARIANT the gateway lists")
    target.add_argument("--artifact", type=_artifact, action="append", default=[], metavar="NAME=PATH",
                        help="direct mode: a soft-prompt artifact directory served as variant NAME")
    target.add_argument("--api-key-env", default=None, help="environment variable holding the API key")
    data = parser.add_argument_group("query sets")
    data.add_argument("--sets", type=_csv, default=("advbench", "jbb_benign"))
    data.add_argument("--custom-set", action="append", default=[], metavar="NAME:KIND:PATH[:COLUMN]",
                      help="your own set: KIND harmful|harmless; .txt (a query per line), .csv or .jsonl "
                           "(query column/key 'query' unless COLUMN given)")
    data.add_argument("--limit", type=int, default=None, help="first N queries of each set")
    data.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    gen = parser.add_argument_group("generation")
    gen.add_argument("--no-greedy", dest="greedy", action="store_false", help="skip the greedy answer")
    gen.add_argument("--samples", type=int, default=0, help="sampled answers per query (paper: 25)")
    gen.add_argument("--keep", type=int, default=None, help="paper metric keeps the N longest (paper: 20)")
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-p", type=float, default=0.9)
    gen.add_argument("--top-k", type=int, default=50)
    gen.add_argument("--min-tokens", type=int, default=10)
    gen.add_argument("--max-tokens-harmful", type=int, default=300)
    gen.add_argument("--max-tokens-harmless", type=int, default=200)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--full-greedy-answers", dest="stop_greedy_when_judged", action="store_false",
                     help="generate greedy answers to max tokens instead of stopping once the refusal "
                          "judges' windows are closed (the verdicts are the same either way)")
    judging = parser.add_argument_group("judges")
    judging.add_argument("--judge", default=None, help="refusal judge (default: safeprompt.judge.DEFAULT_JUDGE)")
    judging.add_argument("--guard-url", default=None, help="OpenAI-compatible URL of a Llama-Guard-style model")
    judging.add_argument("--guard-model", default=None)
    judging.add_argument("--guard-api-key-env", default=None)
    run = parser.add_argument_group("run")
    run.add_argument("--run-dir", type=Path, required=True, help="results and resumable cache")
    run.add_argument("--concurrency", type=int, default=4)
    run.add_argument("--timeout-s", type=float, default=600.0)
    run.add_argument("--max-requests", type=int, default=None, help="stop after N new requests")
    run.add_argument("--no-chart", dest="chart", action="store_false")
    return parser


def _secret(env_name: str | None) -> str:
    if env_name is None:
        return "EMPTY"
    value = os.environ.get(env_name)
    if not value:
        raise ConfigError(f"environment variable {env_name} is not set")
    return value


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    from safeprompt.judge import DEFAULT_JUDGE

    if (args.guard_url is None) != (args.guard_model is None):
        raise ConfigError("--guard-url and --guard-model go together")
    guard = (GuardSettings(args.guard_url, args.guard_model, _secret(args.guard_api_key_env))
             if args.guard_url else None)
    artifacts = dict(args.artifact)
    if len(artifacts) != len(args.artifact):
        raise ConfigError("an --artifact name is given twice")
    return EvalConfig(
        base_url=args.base_url, model=args.model, run_dir=args.run_dir, variants=args.variants, mode=args.mode,
        artifacts=artifacts, sets=args.sets, custom_sets=tuple(args.custom_set), limit=args.limit,
        greedy=args.greedy, samples=args.samples, keep=args.keep, temperature=args.temperature,
        top_p=args.top_p, top_k=args.top_k, min_tokens=args.min_tokens,
        max_tokens_harmful=args.max_tokens_harmful, max_tokens_harmless=args.max_tokens_harmless,
        seed=args.seed, judge=args.judge or DEFAULT_JUDGE, guard=guard, api_key=_secret(args.api_key_env),
        concurrency=args.concurrency, timeout_s=args.timeout_s, max_requests=args.max_requests,
        data_dir=args.data_dir, chart=args.chart, stop_greedy_when_judged=args.stop_greedy_when_judged)


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
    except (ConfigError, QuerySetError, TargetError, CacheError, EvalRequestError, ValueError) as exc:
        print(f"dro-eval: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dro-eval: interrupted; every finished request is cached: rerun the same command to resume",
              file=sys.stderr, flush=True)
        # Exit now: a normal exit would join the worker threads, i.e. wait for requests in flight.
        os._exit(130)
    print(render_markdown(result.report))
    for kind, path in result.paths.items():
        print(f"{kind}: {path}", file=sys.stderr)
    if not result.finished:
        print("dro-eval: run not finished (stopped early or answers missing); rerun the same command to resume",
              file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
