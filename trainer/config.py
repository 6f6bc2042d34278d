"""Typed configuration: one pydantic model per stage, validated up front, saved into the run and the artifact.

The defaults are the paper's (authors' `generate.py`, `evaluate.py`, `estimate.py`, `train.py`).
Loss ablations are weights (0 disables a term), not flags. Nothing here is read at import time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from safeprompt.judge.model_judge import ModelJudgeSettings

MASKED_SECRET = "**********"  # how pydantic writes a SecretStr into JSON
from safeprompt.prompts import PROMPT_CONDITIONS
from safeprompt.sampling import (
    PAPER_NUM_KEEP,
    PAPER_NUM_SAMPLES,
    PAPER_SAMPLING,
    MaxTokens,
    MinTokens,
    Sampling,
    Temperature,
    TopP,
)

Condition = Literal["none", "default", "short", "mistral"]
# What θ starts from: a human prompt's in-context tokens, or `template_default`, the system prompt
# the model's own chat template inserts when a chat has none (what the `none` condition sends,
# e.g. Qwen2.5's "You are Qwen, created by Alibaba Cloud..."); an error for templates without one.
InitPrompt = Literal["default", "short", "mistral", "template_default"]
Device = Literal["auto", "cpu", "cuda"]
ModelDtype = Literal["float32", "bfloat16", "float16"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class DataConfig(_Strict):
    """Two query files of equal length: harmful (y = 0) and harmless (y = 1).

    `.csv` files are read by `column` (JBB-Behaviors: `goal`); any other file is one query a line.
    """

    harmful_file: Path = Path("data/jbb_behaviors/harmful-behaviors.csv")
    harmless_file: Path = Path("data/jbb_behaviors/benign-behaviors.csv")
    column: str = "goal"
    limit: int | None = Field(default=None, gt=0, description="use only the first N queries of each file")


class LabelConfig(_Strict):
    backend: Literal["vllm", "hf"] = "vllm"
    vllm_url: str | None = Field(default=None, description="base URL of an OpenAI-compatible vLLM server")
    served_model_name: str | None = None
    conditions: tuple[Condition, ...] = PROMPT_CONDITIONS  # type: ignore[assignment]
    # The project's default judge (safeprompt.judge.DEFAULT_JUDGE); the paper used its string matcher
    # (`paper`) plus LlamaGuard: a recorded deviation (docs/trainer.md).
    judge: str = "phrases"
    # A refusal judge model behind an OpenAI-compatible API that replaces `judge` for the labels
    # (trainer.label, docs/judges.md); it reads the query too, and whole samples.
    model_judge: ModelJudgeSettings | None = None
    # The judge model's API key from this environment variable (config.json never holds a key: it is
    # written masked, so a key given in the config does not survive a resume).
    model_judge_api_key_env: str | None = None
    num_samples: int = Field(default=PAPER_NUM_SAMPLES, gt=0)
    num_keep: int = Field(default=PAPER_NUM_KEEP, gt=0, description="keep the N longest samples (whitespace words)")
    # The paper's sampling (safeprompt.sampling, shared with dro-eval), under Hugging Face's names.
    temperature: Temperature = PAPER_SAMPLING.temperature
    top_p: TopP = PAPER_SAMPLING.top_p
    top_k: int = PAPER_SAMPLING.top_k
    min_new_tokens: MinTokens = PAPER_SAMPLING.min_tokens
    max_new_tokens_harmful: MaxTokens = PAPER_SAMPLING.max_tokens_harmful
    max_new_tokens_harmless: MaxTokens = PAPER_SAMPLING.max_tokens_harmless
    # Deviation when True: stop a sample once the judge's window is closed (verdict final); the
    # "keep the longest" selection then sees truncated lengths.
    stop_when_judged: bool = False
    seed: int = 0
    concurrency: int = Field(default=64, gt=0, description="requests in flight (vLLM backend; it batches them)")
    request_timeout_s: float = Field(default=600.0, gt=0)

    @model_validator(mode="after")
    def _keep_le_samples(self) -> "LabelConfig":
        if self.num_keep > self.num_samples:
            raise ValueError(f"num_keep ({self.num_keep}) > num_samples ({self.num_samples})")
        if not self.conditions or len(set(self.conditions)) != len(self.conditions):
            raise ValueError("conditions must be non-empty and distinct")
        if self.model_judge is not None and self.stop_when_judged:
            raise ValueError("a refusal judge model reads whole samples: model_judge needs stop_when_judged false")
        if self.model_judge is not None and self.model_judge.api_key.get_secret_value() == MASKED_SECRET:
            raise ValueError("label.model_judge.api_key is the masked value a run's config.json holds: give the key "
                             "through label.model_judge_api_key_env (an environment variable's name)")
        return self

    @property
    def sampling(self) -> Sampling:
        return Sampling.of(self)


class ExtractConfig(_Strict):
    # Rows per batch share one prefix pass (trainer.model); without gradients memory is small.
    batch_size: int = Field(default=64, gt=0)
    # bf16 as the authors (and as vLLM serves by default); the states are stored as float32.
    dtype: ModelDtype = "bfloat16"


class BalanceConfig(_Strict):
    """When refusal labels cannot support a refusal direction (checked before fitting)."""

    min_refusal_rate: float = Field(default=0.05, ge=0, le=1, description="mean refusal over all states, lower bound")
    max_refusal_rate: float = Field(default=0.95, ge=0, le=1)
    min_harmful_margin: float = Field(
        default=0.05, description="harmful refusal rate minus harmless refusal rate must reach this")


class FitConfig(_Strict):
    num_components: int = Field(default=4, gt=0)
    lr: float = 1e-4
    weight_decay: float = 0.01
    max_steps: int = Field(default=10000, gt=0)
    patience: int = Field(default=3, gt=0)
    min_delta: float = 1e-4
    # "paper": the authors' tiny-lr AdamW with early stopping; "converged": each fold's logistic
    # regression fitted to its optimum (L-BFGS, L2 penalty `l2`); see trainer/fit.py.
    probe_solver: Literal["paper", "converged"] = "paper"
    l2: float = Field(default=0.01, ge=0)
    num_folds: int = Field(default=10, gt=1)
    seed: int = 42
    balance: BalanceConfig = BalanceConfig()
    force: bool = Field(default=False, description="fit even when the label-balance check fails (artifact marked forced)")


class OptimizeConfig(_Strict):
    init_prompt: InitPrompt = "default"
    # The frozen model's dtype in the forward/backward pass. θ and AdamW's state stay float32 (master
    # copy); θ is cast to this dtype where it is spliced in, exactly as vLLM casts the payload to the
    # dtype it serves in. Train in the dtype the model is served in (vLLM: bf16 by default; a server
    # started with --dtype float32 needs optimize.dtype=float32).
    dtype: ModelDtype = "bfloat16"
    weight_refusal: float = Field(default=1.0, ge=0)
    weight_harmfulness: float = Field(default=0.01, ge=0)
    weight_off_subspace: float = Field(default=0.001, ge=0)
    weight_harmless: float = Field(default=1.0, gt=0, description=(
        "sample weight of harmless queries (paper: 1); above 1 trades harmful gain for fewer false refusals"))
    lr: float = 1e-3
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    batch_size: int = Field(default=50, gt=0)
    # The whole batch in one pass by default: packed rows (trainer.model) hold less than 10 padded rows did.
    micro_batch_size: int = Field(default=50, gt=0, description="gradient accumulation chunk (memory only)")
    epochs: int = Field(default=40, gt=0)
    seed: int = 42
    # Health check after training (not in the paper): greedy answers of this many harmful and as
    # many harmless training queries under θ0 and θ, to see what the prompt did to answers' length.
    answer_check_queries: int = Field(default=4, ge=0, description="per class; 0 disables")
    answer_check_tokens: int = Field(default=64, gt=0)


class ExportConfig(_Strict):
    name: str = "dro"
    artifact_dir: Path | None = Field(default=None, description="default: <run_dir>/artifact")
    plots: bool = True


class RunConfig(_Strict):
    model_dir: Path
    base_model: str | None = Field(default=None, description="name recorded in the manifest (default: folder name)")
    run_dir: Path
    torch_threads: int | None = Field(
        default=None, gt=0, description="torch intra-op threads (1 is much faster on a crowded CPU)")
    device: Device = Field(default="auto", description="where extract and optimize run: auto = cuda when available")
    data: DataConfig = DataConfig()
    label: LabelConfig = LabelConfig()
    extract: ExtractConfig = ExtractConfig()
    fit: FitConfig = FitConfig()
    optimize: OptimizeConfig = OptimizeConfig()
    export: ExportConfig = ExportConfig()
