"""Export stage: the run's outputs -> one gateway artifact (`safeprompt.artifact_write.save_artifact`, atomic).

The manifest records the configs, data hashes, label balance, fit and training metrics, stage
timings and `forced`. The chat-template hash is the one `safeprompt.artifact.read_model_info` computes
from the model folder; export checks that the tokenizer the trainer used carries the same template,
so the gateway accepts the artifact for exactly the model it was trained on.
The geometry tensors are `trainer.geometry.DroGeometry`'s, read from `directions.safetensors` and
written back under the same names. Runs under `trainer.pipeline`'s stage runner (`run_export`).
Knows the run-directory layout (via `trainer.store`) and the artifact format; no training maths.
"""

from __future__ import annotations

from pathlib import Path

import torch

from safeprompt.artifact import Manifest, read_model_info
from safeprompt.artifact_write import save_artifact
from safeprompt.files import sha256_text
from trainer import store
from trainer.config import RunConfig
from trainer.data import load_training_queries
from trainer.geometry import DroGeometry


def check_template_hash(model_dir: Path) -> str | None:
    """read_model_info's hash, verified against the template transformers loads for the trainer."""
    from transformers import AutoTokenizer

    info = read_model_info(model_dir)
    template = AutoTokenizer.from_pretrained(model_dir).chat_template
    trainer_hash = sha256_text(template) if isinstance(template, str) else None
    if trainer_hash != info.chat_template_sha256:
        raise ValueError(f"chat template of {model_dir} as the trainer loads it (sha256 {trainer_hash}) differs "
                         f"from the one the gateway reads ({info.chat_template_sha256})")
    return info.chat_template_sha256


def export_artifact(config: RunConfig, target: Path) -> Path:
    """The run's outputs -> the artifact at `target` (and the plots under <run_dir>/plots)."""
    run_dir = config.run_dir
    data = load_training_queries(config.data)
    geometry = DroGeometry.from_tensors(store.read_tensors(run_dir / "directions.safetensors"))
    optimized = store.read_tensors(run_dir / "soft_prompt.safetensors")
    fit, optimize = store.read_json(run_dir / "fit.json"), store.read_json(run_dir / "optimize.json")
    # The soft prompt is stored in the dtype it was spliced in during training when that is bf16 (the
    # dtype vLLM serves in by default): the gateway then sends exactly the rows the trainer used, in
    # half the bytes. Otherwise float32 (vLLM casts once to its dtype; never a third dtype).
    stored_dtype = torch.bfloat16 if config.optimize.dtype == "bfloat16" else torch.float32
    soft = optimized["soft_prompt"].to(stored_dtype)
    history = optimize["history"]
    timings = {stage: store.stage_seconds(run_dir, stage) for stage in ("label", "extract", "fit", "optimize")}
    info = read_model_info(config.model_dir)
    manifest = Manifest(
        name=config.export.name,
        base_model=config.base_model or config.model_dir.name,
        hidden_size=int(soft.shape[1]),
        num_virtual_tokens=int(soft.shape[0]),
        chat_template_sha256=check_template_hash(config.model_dir),
        dtype=str(stored_dtype).removeprefix("torch."),
        origin="dro-trainer",
        init_prompt=config.optimize.init_prompt,
        forced=bool(fit["forced"]),
        configs=config.model_dump(mode="json"),
        data_hashes=data.hashes,
        metrics={
            "label_balance": fit["balance"], "failed_balance_checks": fit["failed_checks"],
            "pca_explained_variance_ratio": fit["explained_variance_ratio"],
            "refusal_probe_accuracy": fit["refusal_accuracy"],
            "harmfulness_probe_accuracy": fit["harmfulness_accuracy"],
            "loss_first": history[0], "loss_last": history[-1], "steps": len(history),
            "score_shift": optimize["score_shift"], "stage_seconds": timings,
            "training_dtype": config.optimize.dtype, "health": optimize.get("health", {}),
        },
        notes=f"model hidden size {info.hidden_size}; trained by python -m trainer",
    )
    save_artifact(target, manifest, {"soft_prompt": soft, **geometry.to_tensors()})
    if config.export.plots:
        from trainer.report import write_plots

        write_plots(run_dir, run_dir / "plots")
    return target
