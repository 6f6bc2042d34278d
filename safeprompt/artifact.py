"""The soft-prompt artifact: one format, written by the trainer and read by the gateway.

An artifact is a directory holding
  - `manifest.json`: a `Manifest` (pydantic) with everything that is not a tensor: the base model,
    hidden size, number of virtual tokens, placement, chat-template hash, origin, configs, data
    hashes and metrics;
  - `tensors.safetensors`: `soft_prompt` [num_virtual_tokens, hidden_size] and, for trained
    artifacts, the DRO geometry (`pca_mean` [hidden], `pca_components` [hidden, k], the refusal and
    harmfulness probes `*_weight` [k] and `*_bias` [] in PCA space).
Never pickle. Writes are atomic: a reader sees the old artifact or the complete new one.

This module knows nothing about HTTP or training; it imports torch and safetensors only.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file

from safeprompt.files import atomic_directory, sha256_text

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
TENSORS_FILE = "tensors.safetensors"
SOFT_PROMPT_KEY = "soft_prompt"
# The key in the soft-prompt files the DRO authors released (type.all_length.*.safetensors).
RELEASED_KEY = "soft_prompt"

Placement = Literal["system_message"]
Origin = Literal["dro-trainer", "paper-release", "human-prompt-embedding", "test"]


class ArtifactError(ValueError):
    """An artifact is missing, malformed, or does not fit the model it is meant for."""


class Manifest(BaseModel):
    """Everything about a soft prompt that is not a tensor."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    format_version: int = FORMAT_VERSION
    name: str = Field(description="variant name the gateway serves it under, e.g. 'dro'")
    base_model: str = Field(description="model the soft prompt was trained for (path or hub id)")
    hidden_size: int = Field(gt=0)
    num_virtual_tokens: int = Field(gt=0)
    # The soft prompt is the whole content of the system message; vLLM renders the model's own
    # chat template around it, exactly where a text system prompt would go.
    placement: Placement = "system_message"
    # sha256 of the chat template string; None only for imports where it is unknown.
    chat_template_sha256: str | None
    dtype: str = Field(description="dtype the soft prompt is stored in, e.g. 'float32'")
    origin: Origin
    init_prompt: str | None = Field(default=None, description="human prompt it was initialised from")
    # True when the trainer was forced past a failed label-balance check: the refusal direction
    # was fitted on labels that cannot support it. Shown by the gateway at load time.
    forced: bool = False
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat())
    configs: dict[str, Any] = Field(default_factory=dict)
    data_hashes: dict[str, str] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    notes: str = ""


class ModelInfo(BaseModel):
    """What an artifact is checked against: read from the served model's Hugging Face folder."""

    model_config = ConfigDict(protected_namespaces=())

    name: str
    hidden_size: int
    chat_template_sha256: str | None
    # The checkpoint's dtype (config.json `dtype`, or `torch_dtype` before transformers 5): what
    # vLLM's `--dtype auto` computes in when it is bfloat16 or float16.
    dtype: str | None = None


def read_model_info(model_dir: str | os.PathLike[str], name: str | None = None) -> ModelInfo:
    """Hidden size and chat-template hash of a local HF model folder, without loading weights.

    The chat template is read where transformers writes it: `chat_template.jinja`, else the
    `chat_template` field of `tokenizer_config.json`.
    """
    folder = Path(model_dir)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ArtifactError(f"model folder {folder} has no config.json")
    config = json.loads(config_path.read_text())
    hidden = config.get("hidden_size") or (config.get("text_config") or {}).get("hidden_size")
    if not isinstance(hidden, int):
        raise ArtifactError(f"cannot read hidden_size from {config_path}")
    template: str | None = None
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        template = jinja.read_text()
    else:
        tokenizer_config = folder / "tokenizer_config.json"
        if tokenizer_config.is_file():
            value = json.loads(tokenizer_config.read_text()).get("chat_template")
            template = value if isinstance(value, str) else None
    dtype = config.get("dtype") or config.get("torch_dtype")
    return ModelInfo(
        name=name or folder.name,
        hidden_size=hidden,
        dtype=dtype if isinstance(dtype, str) else None,
        chat_template_sha256=sha256_text(template) if template is not None else None,
    )


class Artifact(BaseModel):
    """A loaded artifact: manifest plus tensors (CPU)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    manifest: Manifest
    tensors: dict[str, torch.Tensor]

    @property
    def soft_prompt(self) -> torch.Tensor:
        """[num_virtual_tokens, hidden_size]"""
        return self.tensors[SOFT_PROMPT_KEY]


def _check_consistent(manifest: Manifest, tensors: dict[str, torch.Tensor], where: str) -> None:
    if SOFT_PROMPT_KEY not in tensors:
        raise ArtifactError(f"{where}: no '{SOFT_PROMPT_KEY}' tensor")
    soft = tensors[SOFT_PROMPT_KEY]
    if soft.ndim != 2:
        raise ArtifactError(f"{where}: soft_prompt must be 2-D [tokens, hidden], got {tuple(soft.shape)}")
    if not soft.is_floating_point():
        raise ArtifactError(f"{where}: soft_prompt must be floating point, got {soft.dtype}")
    if tuple(soft.shape) != (manifest.num_virtual_tokens, manifest.hidden_size):
        raise ArtifactError(
            f"{where}: soft_prompt shape {tuple(soft.shape)} does not match the manifest "
            f"({manifest.num_virtual_tokens}, {manifest.hidden_size})"
        )
    if not torch.isfinite(soft).all():
        raise ArtifactError(f"{where}: soft_prompt contains NaN or Inf")


def save_artifact(path: str | os.PathLike[str], manifest: Manifest, tensors: dict[str, torch.Tensor]) -> Path:
    """Write an artifact directory atomically (temp dir + rename); replace an existing one."""
    target = Path(path)
    _check_consistent(manifest, tensors, str(target))
    with atomic_directory(target) as staging:
        # safetensors needs contiguous, non-shared storage: clone each tensor.
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(staging / TENSORS_FILE))
        (staging / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2) + "\n")
        for file in staging.iterdir():
            os.chmod(file, 0o644)
    return target


def load_artifact(path: str | os.PathLike[str]) -> Artifact:
    """Read and self-check an artifact directory; ArtifactError says what is wrong."""
    folder = Path(path)
    manifest_path, tensors_path = folder / MANIFEST_FILE, folder / TENSORS_FILE
    if not manifest_path.is_file() or not tensors_path.is_file():
        raise ArtifactError(f"{folder} is not an artifact: needs {MANIFEST_FILE} and {TENSORS_FILE}")
    try:
        manifest = Manifest.model_validate_json(manifest_path.read_text())
    except ValueError as exc:
        raise ArtifactError(f"{manifest_path}: invalid manifest: {exc}") from None
    if manifest.format_version != FORMAT_VERSION:
        raise ArtifactError(f"{manifest_path}: format_version {manifest.format_version}, expected {FORMAT_VERSION}")
    try:
        tensors = load_file(str(tensors_path))
    except Exception as exc:  # safetensors raises its own error types
        raise ArtifactError(f"{tensors_path}: unreadable safetensors: {exc}") from None
    _check_consistent(manifest, tensors, str(folder))
    return Artifact(manifest=manifest, tensors=tensors)


def check_artifact_fits(artifact: Artifact, model: ModelInfo) -> None:
    """Refuse an artifact that does not belong to the served model, naming the mismatch."""
    m = artifact.manifest
    if m.hidden_size != model.hidden_size:
        raise ArtifactError(
            f"artifact '{m.name}' has hidden size {m.hidden_size} (trained for {m.base_model}), "
            f"but served model '{model.name}' has hidden size {model.hidden_size}"
        )
    if (
        m.chat_template_sha256 is not None
        and model.chat_template_sha256 is not None
        and m.chat_template_sha256 != model.chat_template_sha256
    ):
        raise ArtifactError(
            f"artifact '{m.name}' was trained with chat template sha256 {m.chat_template_sha256[:12]}… "
            f"(for {m.base_model}), but served model '{model.name}' has chat template "
            f"{model.chat_template_sha256[:12]}…: the soft prompt would sit in different surroundings"
        )


def import_released(
    released_file: str | os.PathLike[str],
    *,
    name: str,
    base_model: str,
    model: ModelInfo,
    init_prompt: str | None = None,
) -> tuple[Manifest, dict[str, torch.Tensor]]:
    """Wrap a soft prompt released by the DRO authors (one key `soft_prompt`, [n, hidden], bf16).

    The user names the model it belongs to (`base_model`, `model`); the file itself does not say.
    The chat-template hash is taken from that model, and the shape is checked against it.
    """
    try:
        tensors = load_file(str(released_file))
    except Exception as exc:
        raise ArtifactError(f"{released_file}: unreadable safetensors: {exc}") from None
    if set(tensors) != {RELEASED_KEY}:
        raise ArtifactError(f"{released_file}: expected exactly one tensor '{RELEASED_KEY}', found {sorted(tensors)}")
    soft = tensors[RELEASED_KEY]
    if soft.ndim != 2:
        raise ArtifactError(f"{released_file}: '{RELEASED_KEY}' must be [n, hidden], got {tuple(soft.shape)}")
    manifest = Manifest(
        name=name,
        base_model=base_model,
        hidden_size=int(soft.shape[1]),
        num_virtual_tokens=int(soft.shape[0]),
        chat_template_sha256=model.chat_template_sha256,
        dtype=str(soft.dtype).removeprefix("torch."),
        origin="paper-release",
        init_prompt=init_prompt,
        notes=f"imported from {Path(released_file).name}",
    )
    artifact = Artifact(manifest=manifest, tensors={SOFT_PROMPT_KEY: soft})
    check_artifact_fits(artifact, model)
    return manifest, {SOFT_PROMPT_KEY: soft}
