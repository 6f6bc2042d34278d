"""The soft-prompt artifact: one format, written by the trainer and read by the gateway.

An artifact is a directory holding
  - `manifest.json`: a `Manifest` (pydantic) with everything that is not a tensor: the base model,
    hidden size, number of virtual tokens, placement, chat-template hash, origin, configs, data
    hashes, metrics, and the serving payloads' file names, sizes and sha256;
  - `tensors.safetensors`: `soft_prompt` [num_virtual_tokens, hidden_size] and, for trained
    artifacts, the DRO geometry (`pca_mean` [hidden], `pca_components` [hidden, k], the refusal and
    harmfulness probes `*_weight` [k] and `*_bias` [] in PCA space);
  - `prompt_embeds.<dtype>.pt` for float32, bfloat16 and float16: the soft prompt as vLLM's
    prompt_embeds payload (`torch.save` bytes) in each dtype vLLM may compute in, written by the
    trainer (`safeprompt.artifact_write`) from the same tensor.
Never unpickled here. Writes are atomic: a reader sees the old artifact or the complete new one.

This module is the one reader, used by the gateway, the evaluation harness and the trainer alike;
it imports no torch: shapes come from the safetensors header (`safeprompt.tensorfile`), and a
payload is checked against its manifest hash and inspected as bytes (`safeprompt.payload`) before
it is served. Format 1 artifacts (before payloads) are refused with the command that converts them.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from safeprompt.embeds import WIRE_DTYPES
from safeprompt.files import sha256_text
from safeprompt.payload import PayloadError, check_payload
from safeprompt.tensorfile import TensorFileError, TensorInfo, read_header

FORMAT_VERSION = 2
MANIFEST_FILE = "manifest.json"
TENSORS_FILE = "tensors.safetensors"
SOFT_PROMPT_KEY = "soft_prompt"
# The key in the soft-prompt files the DRO authors released (type.all_length.*.safetensors).
RELEASED_KEY = "soft_prompt"
CONVERT_COMMAND = "dro-trainer convert-artifact --artifact"

Placement = Literal["system_message"]
Origin = Literal["dro-trainer", "paper-release", "human-prompt-embedding", "test"]


def payload_file_name(dtype: str) -> str:
    return f"prompt_embeds.{dtype}.pt"


class ArtifactError(ValueError):
    """An artifact is missing, malformed, or does not fit the model it is meant for."""


class PayloadFile(BaseModel):
    """One serving payload beside the tensors: its file name in the artifact, size and sha256."""

    model_config = ConfigDict(extra="forbid")

    file: str
    bytes: int = Field(gt=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


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
    # Serving payloads by wire dtype (all of WIRE_DTYPES); filled in by the writer.
    payloads: dict[str, PayloadFile] = Field(default_factory=dict)


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


@dataclass(frozen=True)
class Artifact:
    """A loaded artifact: its folder, manifest and the header of its tensors (no tensor data)."""

    folder: Path
    manifest: Manifest
    tensors: dict[str, TensorInfo]

    def payload(self, dtype: str) -> bytes:
        """The soft prompt as vLLM's prompt_embeds payload in `dtype`: read, hash-checked, inspected."""
        entry = self.manifest.payloads.get(dtype)
        if entry is None:
            raise ArtifactError(f"{self.folder}: no {dtype} payload in the manifest")
        path = self.folder / entry.file
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ArtifactError(f"{path}: unreadable payload: {exc}") from None
        if len(data) != entry.bytes or hashlib.sha256(data).hexdigest() != entry.sha256:
            raise ArtifactError(f"{path}: payload does not match the size and sha256 in the manifest")
        shape = (self.manifest.num_virtual_tokens, self.manifest.hidden_size)
        try:
            check_payload(data, dtype=dtype, shape=shape, where=str(path))
        except PayloadError as exc:
            raise ArtifactError(str(exc)) from None
        return data


def check_header(manifest: Manifest, tensors: dict[str, TensorInfo], where: str) -> None:
    """The soft prompt in the safetensors header agrees with the manifest (2-D, float, shape, dtype)."""
    soft = tensors.get(SOFT_PROMPT_KEY)
    if soft is None:
        raise ArtifactError(f"{where}: no '{SOFT_PROMPT_KEY}' tensor")
    if len(soft.shape) != 2:
        raise ArtifactError(f"{where}: soft_prompt must be 2-D [tokens, hidden], got {soft.shape}")
    if soft.shape != (manifest.num_virtual_tokens, manifest.hidden_size):
        raise ArtifactError(
            f"{where}: soft_prompt shape {soft.shape} does not match the manifest "
            f"({manifest.num_virtual_tokens}, {manifest.hidden_size})"
        )
    if soft.dtype != manifest.dtype:
        raise ArtifactError(f"{where}: soft_prompt is stored as {soft.dtype}, the manifest says {manifest.dtype}")


def read_raw_manifest(folder: Path) -> dict[str, Any]:
    """An artifact folder's manifest as plain JSON (any format version), after checking that the
    folder holds a manifest and tensors; ArtifactError otherwise."""
    manifest_path, tensors_path = folder / MANIFEST_FILE, folder / TENSORS_FILE
    if not manifest_path.is_file() or not tensors_path.is_file():
        raise ArtifactError(f"{folder} is not an artifact: needs {MANIFEST_FILE} and {TENSORS_FILE}")
    try:
        raw = json.loads(manifest_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{manifest_path}: invalid manifest: not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ArtifactError(f"{manifest_path}: invalid manifest: not a JSON object")
    return raw


def load_artifact(path: str | os.PathLike[str]) -> Artifact:
    """Read and self-check an artifact directory; ArtifactError says what is wrong.

    Checks the manifest, the safetensors header against it, and that every payload the manifest
    names is there with its recorded size; `Artifact.payload` checks a payload's hash and content.
    """
    folder = Path(path)
    manifest_path, tensors_path = folder / MANIFEST_FILE, folder / TENSORS_FILE
    raw = read_raw_manifest(folder)
    version = raw.get("format_version")
    if version == 1:
        raise ArtifactError(
            f"{folder} is a format 1 artifact, which carries no serving payloads; convert it once "
            f"with `{CONVERT_COMMAND} {folder}` (the trainer's install: it needs torch)"
        )
    if version != FORMAT_VERSION:
        raise ArtifactError(f"{manifest_path}: format_version {version!r}, expected {FORMAT_VERSION}")
    try:
        manifest = Manifest.model_validate(raw)
    except ValueError as exc:
        raise ArtifactError(f"{manifest_path}: invalid manifest: {exc}") from None
    try:
        tensors = read_header(tensors_path)
    except (TensorFileError, OSError) as exc:
        raise ArtifactError(f"{tensors_path}: unreadable safetensors: {exc}") from None
    check_header(manifest, tensors, str(folder))
    if set(manifest.payloads) != set(WIRE_DTYPES):
        raise ArtifactError(
            f"{manifest_path}: payloads for {sorted(manifest.payloads)}, expected {sorted(WIRE_DTYPES)}"
        )
    for dtype, entry in manifest.payloads.items():
        file = folder / entry.file
        if entry.file != payload_file_name(dtype) or not file.is_file() or file.stat().st_size != entry.bytes:
            raise ArtifactError(f"{folder}: the {dtype} payload {entry.file} is missing or not {entry.bytes} bytes")
    return Artifact(folder=folder, manifest=manifest, tensors=tensors)


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
