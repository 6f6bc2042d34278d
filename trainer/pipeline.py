"""The five stages over a run directory: each reads its inputs, calls the pure stage functions, and
writes its outputs atomically, then a completion record so a rerun resumes after it.

run_dir/
  config.json                      the validated RunConfig
  labels.partial.jsonl / labels.json   label records (per (condition, query)) and soft labels [C, Q]
  states.safetensors + states.json     h(x, S) [C, Q, hidden] float32, condition-major
  balance.json                      refusal-label balance (written before the fit decides)
  directions.safetensors + fit.json PCA basis, probes (fold-averaged and per fold), fit metrics
  soft_prompt.safetensors + optimize.json  θ, its init, hθ of the training queries, loss history
  artifact/ (default)               the gateway artifact; plots/ PNGs
  <stage>.done.json                 the stage's config fingerprint and seconds (trainer.store)

Every stage runs through one runner, the `stage` decorator: a stage whose completion record matches
its config and whose output exists is skipped; otherwise its body runs, timed, and the record is
written after it. `STAGE_RUNNERS` maps names to the decorated functions (`run_<stage>(config,
show_progress) -> output path`).
Knows the file layout and stage order; the maths lives in the stage modules.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from safeprompt.files import sha256_file
from safeprompt.judge import get_judge, judge_revision
from safeprompt.judge.model_judge import revision as model_judge_revision
from trainer import store
from trainer.balance import check_balance, measure_balance
from trainer.config import RunConfig
from trainer.data import load_training_queries
from trainer.health import answer_health, optimization_health, probe_health

STAGES = ("label", "extract", "fit", "optimize", "export")


class LabelBalanceError(RuntimeError):
    """The refusal labels cannot support a refusal direction (and the run was not forced)."""


def model_key(config: RunConfig) -> dict:
    folder = config.model_dir
    config_file = folder / "config.json"
    return {"model_dir": str(folder.resolve()),
            "config_sha256": sha256_file(config_file) if config_file.is_file() else None}


def stage_keys(config: RunConfig) -> dict[str, dict]:
    """What each stage's outputs depend on (upstream keys included)."""
    data = {"data": config.data.model_dump(mode="json"), "model": model_key(config)}
    label = {**data, "label": config.label.model_dump(mode="json", exclude={"vllm_url", "concurrency",
                                                                           "request_timeout_s", "model_judge",
                                                                           "model_judge_api_key_env"}),
             # The judge's rules, not only its name: a newer revision labels again.
             "judge_revision": judge_revision(config.label.judge)}
    if config.label.model_judge is not None:  # its model and settings, its prompt and reading, likewise
        label["model_judge"] = config.label.model_judge.model_dump(mode="json",
                                                                   exclude={"base_url", "api_key", "timeout_s"})
        label["model_judge_revision"] = model_judge_revision()
    extract = {**data, "extract": config.extract.model_dump(mode="json"), "conditions": list(config.label.conditions)}
    fit = {"label": label, "extract": extract, "fit": config.fit.model_dump(mode="json")}
    optimize = {"fit": fit, "optimize": config.optimize.model_dump(mode="json")}
    export = {"optimize": optimize, "export": config.export.model_dump(mode="json"), "base_model": config.base_model}
    return {"label": label, "extract": extract, "fit": fit, "optimize": optimize, "export": export}


def _load_frozen(config: RunConfig, dtype: str = "float32"):
    from trainer.model import load_frozen_model

    return load_frozen_model(config.model_dir, dtype, config.device)


_STAGE_OUTPUTS: dict[str, Callable[[RunConfig], Path]] = {}


def stage_is_done(config: RunConfig, name: str) -> bool:
    """The stage's completion record matches its current key and its output exists."""
    return (store.stage_done(config.run_dir, name, stage_keys(config)[name])
            and _STAGE_OUTPUTS[name](config).exists())


def stage(name: str, output: Callable[[RunConfig], Path]):
    """The one stage runner, as a decorator over a stage body `(config, show_progress) -> None`.

    `output(config)` is the file whose presence (with a matching completion record) means the stage is
    done; the decorated function returns it. The body writes its outputs atomically; the record
    (fingerprint of `stage_keys(config)[name]`, seconds the body took) is written only after it returns.
    """
    def wrap(body: Callable[[RunConfig, bool], object]) -> Callable[..., Path]:
        _STAGE_OUTPUTS[name] = output

        @functools.wraps(body)
        def run(config: RunConfig, show_progress: bool = True) -> Path:
            if not stage_is_done(config, name):
                started = time.monotonic()
                body(config, show_progress)
                store.mark_done(config.run_dir, name, stage_keys(config)[name], time.monotonic() - started)
            return output(config)
        return run
    return wrap


# --- label ---------------------------------------------------------------------------------------

@stage("label", lambda config: config.run_dir / "labels.json")
def run_label(config: RunConfig, show_progress: bool = True) -> Path:
    from safeprompt.client import ChatClient
    from safeprompt.model_judge_client import ModelJudgeClient
    from trainer.label import LabelRecord, sample_hf, sample_vllm

    run_dir, key = config.run_dir, stage_keys(config)["label"]
    out = run_dir / "labels.json"
    data = load_training_queries(config.data)
    judge = get_judge(config.label.judge)
    partial = run_dir / "labels.partial.jsonl"
    done: dict[tuple[str, int], dict] = {}
    fingerprint = store.fingerprint(key)
    if partial.is_file():
        lines = partial.read_text().splitlines()
        if lines and json.loads(lines[0]).get("fingerprint") == fingerprint:
            for line in lines[1:]:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut by an interrupted run
                    continue
                done[(record["condition"], record["query_index"])] = record
        else:
            partial.unlink()
    if not partial.is_file():
        run_dir.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps({"fingerprint": fingerprint}) + "\n")
    jobs = [(c, i, q, data.harmless[i] > 0.5) for c in config.label.conditions
            for i, q in enumerate(data.queries) if (c, i) not in done]
    with open(partial, "a") as sink, tqdm(total=len(jobs), desc="label", unit="query",
                                          disable=not show_progress) as bar:
        def on_done(record: LabelRecord) -> None:
            done[(record.condition, record.query_index)] = record.to_json()
            sink.write(json.dumps(record.to_json()) + "\n")
            sink.flush()
            bar.update(1)

        with contextlib.ExitStack() as stack:
            model_judge = None
            judge_model = config.label.model_judge
            if judge_model is not None:
                key_env = config.label.model_judge_api_key_env
                if key_env is not None and not os.environ.get(key_env):
                    raise ValueError(f"label.model_judge_api_key_env: environment variable {key_env} is not set")
                api_key = os.environ[key_env] if key_env is not None else judge_model.api_key.get_secret_value()
                client = stack.enter_context(ChatClient(judge_model.base_url, api_key=api_key,
                                                        timeout_s=judge_model.timeout_s,
                                                        max_connections=config.label.concurrency))
                model_judge = ModelJudgeClient(judge_model, client)
            if config.label.backend == "vllm":
                sample_vllm(config.label, jobs, judge, on_done, model_judge=model_judge)
            else:
                sample_hf(config.label, _load_frozen(config), jobs, judge, on_done, model_judge=model_judge)
    conditions = list(config.label.conditions)
    soft = [[done[(c, i)]["soft_label"] for i in range(len(data.queries))] for c in conditions]
    records = [done[(c, i)] for c in conditions for i in range(len(data.queries))]
    store.write_json(out, {"conditions": conditions, "queries": data.queries, "harmless": data.harmless,
                           "soft_labels": soft, "records": records})
    partial.unlink(missing_ok=True)
    return out


def read_labels(run_dir: Path) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(conditions, soft labels [C, Q] float32 (1 = complied), harmless [Q] float32)."""
    labels = store.read_json(run_dir / "labels.json")
    return (labels["conditions"], torch.tensor(labels["soft_labels"], dtype=torch.float32),
            torch.tensor(labels["harmless"], dtype=torch.float32))


# --- extract -------------------------------------------------------------------------------------

@stage("extract", lambda config: config.run_dir / "states.safetensors")
def run_extract(config: RunConfig, show_progress: bool = True) -> None:
    from trainer.extract import extract_states

    data = load_training_queries(config.data)
    frozen = _load_frozen(config, config.extract.dtype)
    states = extract_states(frozen, list(config.label.conditions), data.queries, config.extract.batch_size,
                            show_progress)
    store.write_tensors(config.run_dir / "states.safetensors", {"states": states})
    store.write_json(config.run_dir / "states.json", {
        "shape": list(states.shape), "dtype": str(states.dtype).removeprefix("torch."),
        "layout": "[condition, query, hidden]", "conditions": list(config.label.conditions),
        "model_dtype": config.extract.dtype,
        "representation": "hidden_states[-1] (after final norm) at the last prompt token"})


# --- fit -----------------------------------------------------------------------------------------

@stage("fit", lambda config: config.run_dir / "directions.safetensors")
def run_fit(config: RunConfig, show_progress: bool = True) -> None:
    from trainer.fit import fit_directions

    run_dir = config.run_dir
    conditions, soft, harmless = read_labels(run_dir)
    states = store.read_tensors(run_dir / "states.safetensors")["states"]
    if list(conditions) != list(config.label.conditions) or states.shape[:2] != soft.shape:
        raise ValueError(f"labels {tuple(soft.shape)} over {conditions} do not match states "
                         f"{tuple(states.shape)}: rerun label and extract with the same data and conditions")
    balance = measure_balance(soft, harmless, conditions)
    reasons = check_balance(balance, config.fit.balance)
    forced = bool(reasons) and config.fit.force
    store.write_json(run_dir / "balance.json", {**balance, "failed_checks": reasons, "forced": forced})
    if reasons and not config.fit.force:
        raise LabelBalanceError(
            "the refusal labels cannot support a refusal direction:\n  - " + "\n  - ".join(reasons)
            + f"\nBalance report: {run_dir / 'balance.json'}. DRO needs a model that refuses some harmful queries "
            "under some prompt. Use a model that refuses, another judge (label.judge), or pass --force to fit "
            "anyway (the artifact is then marked forced=True).")
    directions = fit_directions(states, soft, harmless, config.fit)
    store.write_tensors(run_dir / "directions.safetensors", directions.to_tensors())
    refusal, harmfulness = directions.refusal, directions.harmfulness
    refusal_health, refusal_warnings = probe_health("refusal", directions.refusal_accuracy,
                                                    directions.refusal_labels)
    harmfulness_health, harmfulness_warnings = probe_health("harmfulness", directions.harmfulness_accuracy,
                                                            directions.harmless_labels)
    store.write_json(run_dir / "fit.json", {
        "forced": forced, "failed_checks": reasons, "balance": balance,
        "explained_variance_ratio": directions.pca.explained_variance_ratio.tolist(),
        "refusal_accuracy": directions.refusal_accuracy,
        "harmfulness_accuracy": directions.harmfulness_accuracy,
        "health": {**refusal_health, **harmfulness_health, "warnings": refusal_warnings + harmfulness_warnings},
        "refusal_fold_steps": refusal.fold_steps, "harmfulness_fold_steps": harmfulness.fold_steps,
        "refusal_heldout_bce": refusal.fold_heldout_bce, "harmfulness_heldout_bce": harmfulness.fold_heldout_bce,
        "refusal_weight_norm": float(refusal.probe.weight.norm()),
        "harmfulness_weight_norm": float(harmfulness.probe.weight.norm()),
    })


# --- optimize ------------------------------------------------------------------------------------

@stage("optimize", lambda config: config.run_dir / "soft_prompt.safetensors")
def run_optimize(config: RunConfig, show_progress: bool = True) -> None:
    from trainer.answers import check_answers
    from trainer.geometry import DroGeometry
    from trainer.optimize import initial_soft_prompt, optimize_soft_prompt, score_shift, soft_prompt_states_batched

    run_dir, cfg = config.run_dir, config.optimize
    data = load_training_queries(config.data)
    geometry = DroGeometry.from_tensors(store.read_tensors(run_dir / "directions.safetensors"))
    frozen = _load_frozen(config, cfg.dtype)
    init = initial_soft_prompt(frozen, cfg.init_prompt, data.queries)
    reference = reference_states(config, frozen, init.condition, init.system, data.queries)
    harmless = torch.tensor(data.harmless)
    soft, history = optimize_soft_prompt(frozen, data.queries, harmless, reference, init.embeddings, geometry, cfg,
                                         show_progress)
    trained = soft_prompt_states_batched(frozen, soft, data.queries, config.extract.batch_size)
    store.write_tensors(run_dir / "soft_prompt.safetensors", {
        "soft_prompt": soft, "init_soft_prompt": init.embeddings, "trained_states": trained,
        "reference_states": reference})
    health, warnings = optimization_health(history)
    answers = check_answers(frozen, init.embeddings, soft, data.queries, data.harmless, cfg.answer_check_queries,
                            cfg.answer_check_tokens)
    if answers:
        answer_figures, answer_warnings = answer_health(answers["init"], answers["trained"], answers["harmless"])
        health, warnings = {**health, **answer_figures}, warnings + answer_warnings
    store.write_json(run_dir / "optimize.json", {
        "init_prompt": cfg.init_prompt, "init_token_ids": init.token_ids, "num_virtual_tokens": len(init.token_ids),
        "dtype": cfg.dtype, "history": history, "health": {**health, "warnings": warnings}, "answers": answers,
        "score_shift": score_shift(trained, reference, harmless, geometry)})


def check_optimize_batches(config: RunConfig) -> None:
    """ValueError unless optimize.batch_size divides the training queries (checked before any stage runs)."""
    from trainer.optimize import check_batch_size

    check_batch_size(len(load_training_queries(config.data).queries), config.optimize.batch_size)


def reference_states(config: RunConfig, frozen, condition: str, system: str | None,
                     queries: list[str]) -> torch.Tensor:
    """h0 = h(x, P) [Q, hidden] float32 with the real prompt, in the optimisation's dtype (so Δz is 0 up to
    rounding at step 0): the extract stage's states of `condition` when they were computed in that dtype,
    else extracted now."""
    from trainer.extract import extract_condition_states

    states_json = config.run_dir / "states.json"
    states_meta = store.read_json(states_json) if states_json.is_file() else {}
    if condition in states_meta.get("conditions", []) and states_meta.get("model_dtype") == config.optimize.dtype:
        return store.read_tensors(config.run_dir / "states.safetensors")["states"][
            states_meta["conditions"].index(condition)]
    return extract_condition_states(frozen, system, queries, config.extract.batch_size)


# --- export --------------------------------------------------------------------------------------

def artifact_dir(config: RunConfig) -> Path:
    return config.export.artifact_dir or config.run_dir / "artifact"


@stage("export", lambda config: artifact_dir(config) / "manifest.json")
def run_export(config: RunConfig, show_progress: bool = True) -> None:
    from trainer.export import export_artifact

    export_artifact(config, artifact_dir(config))


STAGE_RUNNERS: dict[str, Callable[..., Path]] = {
    "label": run_label, "extract": run_extract, "fit": run_fit, "optimize": run_optimize, "export": run_export}
