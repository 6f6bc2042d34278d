"""One evaluation run, end to end: sets, variants, answers, harm verdicts, verdicts of an optional
refusal judge model, report files.

`evaluate(config, command)` is what `dro-eval` calls; tests call it too. It binds the run
directory to the config's generation fingerprint (so a rerun resumes instead of mixing settings),
sends what is missing, and writes results.<judge>.md / .json / tradeoff.<judge>.png, once by the
string refusal judge (the dashboards' judge) and, with a refusal judge model, once more by it.
This module wires the others together and holds no metric or HTTP logic of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safeprompt.judge import get_judge
from safeprompt.model_judge_client import ModelJudgeClient

from evaluation import report as reporting
from evaluation.cache import ResultCache, bind_run_dir
from evaluation.client import ChatClient, guard_client, model_judge_client, target_client
from evaluation.config import EvalConfig
from evaluation.guard import HarmGuard
from evaluation.model_judging import verdict_digest, verdict_file
from evaluation.querysets import QuerySet, load_builtin_set, parse_custom_set
from evaluation.runner import (
    Budget,
    answer_worker,
    check_cached_queries,
    guard_worker,
    model_judge_worker,
    plan_answers,
    plan_guard,
    plan_model_judge,
    run_pending,
)
from evaluation.targets import DirectTarget, GatewayTarget, Target, resolve_gateway_variants

ANSWERS_FILE = "answers.jsonl"


@dataclass(frozen=True)
class RunResult:
    report: dict[str, Any]
    paths: dict[str, Path]
    sent_answers: int
    sent_guard: int
    finished: bool
    # With a refusal judge model: the same report judged by it (None otherwise).
    model_report: dict[str, Any] | None = None
    model_paths: dict[str, Path] | None = None
    sent_model_judge: int = 0


def load_sets(config: EvalConfig) -> list[QuerySet]:
    sets = [load_builtin_set(name, config.data_dir) for name in config.sets]
    sets += [parse_custom_set(spec) for spec in config.custom_sets]
    names = [query_set.name for query_set in sets]
    if len(names) != len(set(names)):
        raise ValueError(f"a set is named twice: {names}")
    return [query_set.head(config.limit) for query_set in sets]


def build_target(config: EvalConfig, client: ChatClient) -> Target:
    served = client.list_models()
    if config.mode == "gateway":
        return GatewayTarget(config.model, resolve_gateway_variants(config.model, config.variants, served))
    if config.model not in served:
        raise ValueError(f"the server at {client.base_url} does not serve {config.model!r}; it serves: "
                         f"{', '.join(served)}")
    return DirectTarget(config.model, config.variants, config.artifacts)


def guard_file(guard_model: str) -> str:
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in guard_model)
    return f"guard-{safe}.jsonl"


def evaluate(config: EvalConfig, command: str) -> RunResult:
    """Run (or resume) the evaluation described by `config`; `command` is printed for reproduction."""
    judge = get_judge(config.judge)
    sets = load_sets(config)
    config.run_dir.mkdir(parents=True, exist_ok=True)
    budget = Budget(config.max_requests)
    with target_client(config) as client:
        target = build_target(config, client)
        bind_run_dir(config.run_dir, config.fingerprint())
        answers = ResultCache(config.run_dir / ANSWERS_FILE)
        items = plan_answers(sets, target.variants, config)
        check_cached_queries(items, answers)
        sent_answers = run_pending(items, answers, answer_worker(client, target, config),
                                   concurrency=config.concurrency, budget=budget, description="answers")
        guard_cache: ResultCache | None = None
        sent_guard = 0
        guard_name = None
        if config.guard is not None:
            with guard_client(config) as client_of_guard:
                guard = HarmGuard(config.guard, client_of_guard)
                guard_name = guard.name
                guard_cache = ResultCache(config.run_dir / guard_file(config.guard.model))
                sent_guard = run_pending(plan_guard(items, answers), guard_cache, guard_worker(guard, answers),
                                         concurrency=config.concurrency, budget=budget, description="harm judge")
        verdicts: ResultCache | None = None
        sent_model_judge = 0
        if config.model_judge is not None:
            with model_judge_client(config) as client_of_judge:
                model_judge = ModelJudgeClient(config.model_judge, client_of_judge)
                verdicts = ResultCache(config.run_dir / verdict_file(config.model_judge))
                sent_model_judge = run_pending(plan_model_judge(items, answers), verdicts,
                                               model_judge_worker(model_judge, answers),
                                               concurrency=config.concurrency, budget=budget,
                                               description="refusal judge model")

    def build_report(judges: reporting.Judges) -> dict[str, Any]:
        rows = reporting.summarise(sets, target.variants, config, answers, guard_cache, judges)
        return {
            "command": command,
            "config": config.public_dict(),
            "variants": list(target.variants),
            "sets": [{"name": s.name, "kind": s.kind, "queries": len(s.queries), "source": s.source} for s in sets],
            "judges": {"refusal": judges.refusal_name, "harm": guard_name},
            "paper_keep": config.kept_samples,
            "finished": all(row["complete_queries"] == row["queries"] for row in rows),
            "rows": rows,
            "tradeoff": reporting.pooled_tradeoff(rows, sets, target.variants, config, answers, guard_cache, judges),
        }

    report = build_report(reporting.string_judges(judge, guard_name))
    paths = reporting.write_report(config.run_dir, report, chart=config.chart)
    model_report = model_paths = None
    if config.model_judge is not None and verdicts is not None:
        model_report = build_report(reporting.model_judges(config.model_judge.name, verdicts, guard_name))
        model_report["model_judge"] = reporting.model_judge_summary([item.key for item in items], answers,
                                                                    verdicts, judge)
        model_paths = reporting.write_report(config.run_dir, model_report, chart=config.chart,
                                             suffix=f"-{verdict_digest(config.model_judge)}")
    finished = report["finished"] and (model_report is None or model_report["finished"])
    return RunResult(report, paths, sent_answers, sent_guard, finished, model_report, model_paths, sent_model_judge)
