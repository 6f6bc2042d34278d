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
Knows the file layout and stage order; the maths lives in the stage modules.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from safeprompt.files import sha256_file
from safeprompt.judge import get_judge
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
                                                                           "request_timeout_s"})}
    extract = {**data, "extract": config.extract.model_dump(mode="json"), "conditions": list(config.label.conditions)}
    fit = {"label": label, "extract": extract, "fit": config.fit.model_dump(mode="json")}
    optimize = {"fit": fit, "optimize": config.optimize.model_dump(mode="json")}
    export = {"optimize": optimize, "export": config.export.model_dump(mode="json"), "base_model": config.base_model}
    return {"label": label, "extract": extract, "fit": fit, "optimize": optimize, "export": export}


def _load_frozen(config: RunConfig, dtype: str = "float32"):
    from trainer.model import load_frozen_model

    return load_frozen_model(config.model_dir, dtype, config.device)


# --- label ---------------------------------------------------------------------------------------

def run_label(config: RunConfig, show_progress: bool = True) -> Path:
    from trainer.label import LabelRecord, sample_hf, sample_vllm

    run_dir, key = config.run_dir, stage_keys(config)["label"]
    out = run_dir / "labels.json"
    if store.stage_done(run_dir, "label", key):
        return out
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
    started = time.monotonic()
    with open(partial, "a") as sink, tqdm(total=len(jobs), desc="label", unit="query",
                                          disable=not show_progress) as bar:
        def on_done(record: LabelRecord) -> None:
            done[(record.condition, record.query_index)] = record.to_json()
            sink.write(json.dumps(record.to_json()) + "\n")
            sink.flush()
            bar.update(1)

        if config.label.backend == "vllm":
            sample_vllm(config.label, jobs, judge, on_done)
        else:
            sample_hf(config.label, _load_frozen(config), jobs, judge, on_done)
    conditions = list(config.label.conditions)
    soft = [[done[(c, i)]["soft_label"] for i in range(len(data.queries))] for c in conditions]
    records = [done[(c, i)] for c in conditions for i in range(len(data.queries))]
    store.write_json(out, {"conditions": conditions, "queries": data.queries, "harmless": data.harmless,
                           "soft_labels": soft, "records": records})
    partial.unlink(missing_ok=True)
    store.mark_done(run_dir, "label", key, time.monotonic() - started)
    return out


def read_labels(run_dir: Path) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(conditions, soft labels [C, Q] float32 (1 = complied), harmless [Q] float32)."""
    labels = store.read_json(run_dir / "labels.json")
    return (labels["conditions"], torch.tensor(labels["soft_labels"], dtype=torch.float32),
            torch.tensor(labels["harmless"], dtype=torch.float32))


# --- extract -------------------------------------------------------------------------------------

def run_extract(config: RunConfig, show_progress: bool = True) -> Path:
    from trainer.extract import extract_states

    run_dir, key = config.run_dir, stage_keys(config)["extract"]
    out = run_dir / "states.safetensors"
    if store.stage_done(run_dir, "extract", key):
        return out
    data = load_training_queries(config.data)
    started = time.monotonic()
    frozen = _load_frozen(config, config.extract.dtype)
    states = extract_states(frozen, list(config.label.conditions), data.queries, config.extract.batch_size,
                            show_progress)
    store.write_tensors(out, {"states": states})
    store.write_json(run_dir / "states.json", {
        "shape": list(states.shape), "dtype": str(states.dtype).removeprefix("torch."),
        "layout": "[condition, query, hidden]", "conditions": list(config.label.conditions),
        "model_dtype": config.extract.dtype,
        "representation": "hidden_states[-1] (after final norm) at the last prompt token"})
    store.mark_done(run_dir, "extract", key, time.monotonic() - started)
    return out


# --- fit -----------------------------------------------------------------------------------------

def paper_order(tensor: torch.Tensor, harmless: torch.Tensor) -> torch.Tensor:
    """[C, Q, ...] -> [C*Q, ...] in estimate.py's order: harmful x conditions, then harmless x conditions."""
    groups = [torch.nonzero(harmless < 0.5).squeeze(-1), torch.nonzero(harmless >= 0.5).squeeze(-1)]
    return torch.cat([tensor[c, g] for g in groups for c in range(tensor.shape[0])])


def run_fit(config: RunConfig, show_progress: bool = True) -> Path:
    from trainer.fit import ProbeRecipe, fit_pca, fit_probes, probe_accuracy

    run_dir, key = config.run_dir, stage_keys(config)["fit"]
    out = run_dir / "directions.safetensors"
    if store.stage_done(run_dir, "fit", key):
        return out
    conditions, soft, harmless = read_labels(run_dir)
    states = store.read_tensors(run_dir / "states.safetensors")["states"]
    if list(conditions) != list(config.label.conditions) or states.shape[:2] != soft.shape:
        raise ValueError(f"labels {tuple(soft.shape)} over {conditions} do not match states "
                         f"{tuple(states.shape)}: rerun label and extract with the same data and conditions")
    assert states.dtype == torch.float32 and states.ndim == 3
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
    started = time.monotonic()
    x = paper_order(states, harmless)  # [C*Q, H]
    y_refusal = paper_order(soft, harmless)  # [C*Q], 1 = complied
    y_harmless = paper_order(harmless.expand_as(soft), harmless)  # [C*Q], 1 = harmless
    pca = fit_pca(x, config.fit.num_components)
    coords = pca.project(x)
    recipe = ProbeRecipe(lr=config.fit.lr, weight_decay=config.fit.weight_decay, max_steps=config.fit.max_steps,
                         patience=config.fit.patience, min_delta=config.fit.min_delta,
                         num_folds=config.fit.num_folds, seed=config.fit.seed,
                         solver=config.fit.probe_solver, l2=config.fit.l2)
    refusal, harmfulness = fit_probes(coords, y_refusal, y_harmless, recipe)
    store.write_tensors(out, {
        "pca_mean": pca.mean, "pca_components": pca.components,
        "refusal_weight": refusal.weight, "refusal_bias": refusal.bias,
        "harmfulness_weight": harmfulness.weight, "harmfulness_bias": harmfulness.bias,
        "refusal_fold_weights": refusal.fold_weights, "refusal_fold_biases": refusal.fold_biases,
        "harmfulness_fold_weights": harmfulness.fold_weights, "harmfulness_fold_biases": harmfulness.fold_biases,
    })
    refusal_accuracy = probe_accuracy(refusal, coords, y_refusal)
    harmfulness_accuracy = probe_accuracy(harmfulness, coords, y_harmless)
    refusal_health, refusal_warnings = probe_health("refusal", refusal_accuracy, y_refusal)
    harmfulness_health, harmfulness_warnings = probe_health("harmfulness", harmfulness_accuracy, y_harmless)
    store.write_json(run_dir / "fit.json", {
        "forced": forced, "failed_checks": reasons, "balance": balance,
        "explained_variance_ratio": pca.explained_variance_ratio.tolist(),
        "refusal_accuracy": refusal_accuracy,
        "harmfulness_accuracy": harmfulness_accuracy,
        "health": {**refusal_health, **harmfulness_health, "warnings": refusal_warnings + harmfulness_warnings},
        "refusal_fold_steps": refusal.fold_steps, "harmfulness_fold_steps": harmfulness.fold_steps,
        "refusal_heldout_bce": refusal.fold_heldout_bce, "harmfulness_heldout_bce": harmfulness.fold_heldout_bce,
        "refusal_weight_norm": float(refusal.weight.norm()), "harmfulness_weight_norm": float(harmfulness.weight.norm()),
    })
    store.mark_done(run_dir, "fit", key, time.monotonic() - started)
    return out


# --- optimize ------------------------------------------------------------------------------------

def run_optimize(config: RunConfig, show_progress: bool = True) -> Path:
    from safeprompt.prompts import HUMAN_PROMPTS
    from trainer.chat import find_prompt_span
    from trainer.extract import extract_condition_states
    from trainer.optimize import (DroGeometry, LossWeights, Schedule, optimize_soft_prompt,
                                  soft_prompt_states_batched)

    run_dir, key = config.run_dir, stage_keys(config)["optimize"]
    out = run_dir / "soft_prompt.safetensors"
    if store.stage_done(run_dir, "optimize", key):
        return out
    cfg = config.optimize
    data = load_training_queries(config.data)
    directions = store.read_tensors(run_dir / "directions.safetensors")
    geometry = DroGeometry(directions["pca_components"], directions["refusal_weight"], directions["harmfulness_weight"])
    started = time.monotonic()
    frozen = _load_frozen(config, cfg.dtype)
    # `template_default`: the system prompt the model's template inserts by itself (condition `none`).
    condition = "none" if cfg.init_prompt == "template_default" else cfg.init_prompt
    prompt = None if condition == "none" else HUMAN_PROMPTS[condition]
    spans = {tuple(find_prompt_span(frozen.tokenizer, frozen.sentinel_id, prompt, q)) for q in data.queries[:8]}
    if len(spans) != 1:
        raise ValueError(f"the {cfg.init_prompt!r} prompt tokenises differently next to different queries")
    span = list(spans.pop())
    init = frozen.embedding().weight[span].detach().float().cpu().clone()  # [N, H]
    # Reference h0 = h(x, P) with the real prompt in the optimisation's dtype (so Δz = 0 at step 0);
    # reuse the extract stage's states when they were computed in that dtype.
    states_meta = store.read_json(run_dir / "states.json") if (run_dir / "states.json").is_file() else {}
    if condition in states_meta.get("conditions", []) and states_meta.get("model_dtype") == cfg.dtype:
        reference = store.read_tensors(run_dir / "states.safetensors")["states"][
            states_meta["conditions"].index(condition)]
    else:
        reference = extract_condition_states(frozen, prompt, data.queries, config.extract.batch_size)
    harmless = torch.tensor(data.harmless)
    schedule = Schedule(lr=cfg.lr, weight_decay=cfg.weight_decay, clip_norm=cfg.clip_norm, batch_size=cfg.batch_size,
                        micro_batch_size=cfg.micro_batch_size, epochs=cfg.epochs, seed=cfg.seed)
    weights = LossWeights(cfg.weight_refusal, cfg.weight_harmfulness, cfg.weight_off_subspace, cfg.weight_harmless)
    soft, history = optimize_soft_prompt(frozen, data.queries, harmless, reference, init, geometry, weights,
                                         schedule, show_progress)
    trained = soft_prompt_states_batched(frozen, soft, data.queries, config.extract.batch_size)
    store.write_tensors(out, {"soft_prompt": soft, "init_soft_prompt": init, "trained_states": trained,
                              "reference_states": reference})
    health, warnings = optimization_health(history)
    answers = check_answers(frozen, init, soft, data.queries, data.harmless, cfg.answer_check_queries,
                            cfg.answer_check_tokens)
    if answers:
        answer_figures, answer_warnings = answer_health(answers["init"], answers["trained"], answers["harmless"])
        health, warnings = {**health, **answer_figures}, warnings + answer_warnings
    store.write_json(run_dir / "optimize.json", {
        "init_prompt": cfg.init_prompt, "init_token_ids": span, "num_virtual_tokens": len(span),
        "dtype": cfg.dtype, "history": history, "health": {**health, "warnings": warnings}, "answers": answers,
        "score_shift": score_shift(trained, reference, harmless, directions)})
    store.mark_done(run_dir, "optimize", key, time.monotonic() - started)
    return out


def check_answers(frozen, init: torch.Tensor, trained: torch.Tensor, queries: list[str], harmless: list[float],
                  per_class: int, max_new_tokens: int) -> dict:
    """Greedy answers of the first `per_class` harmful and harmless training queries under θ0 and θ."""
    from trainer.answers import greedy_answers

    if per_class == 0:
        return {}
    chosen = ([i for i, h in enumerate(harmless) if h < 0.5][:per_class]
              + [i for i, h in enumerate(harmless) if h >= 0.5][:per_class])
    picked = [queries[i] for i in chosen]
    return {"harmless": [harmless[i] >= 0.5 for i in chosen], "max_new_tokens": max_new_tokens,
            "init": [a.to_json() for a in greedy_answers(frozen, init, picked, max_new_tokens)],
            "trained": [a.to_json() for a in greedy_answers(frozen, trained, picked, max_new_tokens)]}


def score_shift(trained: torch.Tensor, reference: torch.Tensor, harmless: torch.Tensor,
                directions: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean change of the refusal score (−w_r·Δz: up = toward refusal) and of the compliance
    probability, for harmful and harmless training queries, from h0 to hθ."""
    refusal_score = -((trained - reference) @ directions["pca_components"] @ directions["refusal_weight"])
    def probability(states: torch.Tensor) -> torch.Tensor:
        z = (states - directions["pca_mean"]) @ directions["pca_components"]
        return torch.sigmoid(z @ directions["refusal_weight"] + directions["refusal_bias"])
    change = probability(trained) - probability(reference)
    harmful_mask, harmless_mask = harmless < 0.5, harmless >= 0.5
    return {"harmful_refusal_score_change": float(refusal_score[harmful_mask].mean()),
            "harmless_refusal_score_change": float(refusal_score[harmless_mask].mean()),
            "harmful_compliance_probability_change": float(change[harmful_mask].mean()),
            "harmless_compliance_probability_change": float(change[harmless_mask].mean())}
