"""Writing artifacts (the trainer's side, with torch): save, import the authors' files, convert old ones.

- `save_artifact(path, manifest, tensors)`: checks the tensors, writes `tensors.safetensors`, the
  serving payloads (`safeprompt.torch_payload.payload_bytes` of the soft prompt in every wire dtype)
  and the manifest naming them with their sha256, reads the staged artifact back through
  `safeprompt.artifact.load_artifact` (the gateway's reader, every payload included), then swaps
  it in atomically: a reader never sees a half-written or unreadable artifact.
- `read_tensors(path)`: an artifact's tensors, for the trainer's reports and comparisons.
- `import_released(file, ...)`: a soft prompt released by the DRO authors -> (manifest, tensors).
- `convert_artifact(path)`: a format 1 artifact (before payloads) -> the current format, in place.
The format itself is `safeprompt.artifact`'s.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from safeprompt.artifact import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    RELEASED_KEY,
    SOFT_PROMPT_KEY,
    TENSORS_FILE,
    Artifact,
    ArtifactError,
    Manifest,
    ModelInfo,
    PayloadFile,
    load_artifact,
    payload_file_name,
    read_raw_manifest,
)
from safeprompt.embeds import WIRE_DTYPES
from safeprompt.files import atomic_directory
from safeprompt.torch_payload import TORCH_DTYPES, dtype_name, payload_bytes


def check_tensors(manifest: Manifest, tensors: dict[str, torch.Tensor], where: str) -> None:
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
    if dtype_name(soft.dtype) != manifest.dtype:
        raise ArtifactError(f"{where}: soft_prompt is {dtype_name(soft.dtype)}, the manifest says {manifest.dtype}")
    if not torch.isfinite(soft).all():
        raise ArtifactError(f"{where}: soft_prompt contains NaN or Inf")
    for dtype in WIRE_DTYPES:  # e.g. float32 values beyond float16's range
        if not torch.isfinite(soft.to(TORCH_DTYPES[dtype])).all():
            raise ArtifactError(f"{where}: soft_prompt overflows {dtype}, a dtype vLLM may serve it in")


def save_artifact(path: str | os.PathLike[str], manifest: Manifest, tensors: dict[str, torch.Tensor]) -> Path:
    """Write an artifact directory atomically (temp dir + rename); replace an existing one."""
    target = Path(path)
    check_tensors(manifest, tensors, str(target))
    soft = tensors[SOFT_PROMPT_KEY]
    with atomic_directory(target) as staging:
        # safetensors needs contiguous, non-shared storage: clone each tensor.
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(staging / TENSORS_FILE))
        payloads = {}
        for dtype in WIRE_DTYPES:
            data = payload_bytes(soft, dtype)
            (staging / payload_file_name(dtype)).write_bytes(data)
            payloads[dtype] = PayloadFile(
                file=payload_file_name(dtype), bytes=len(data), sha256=hashlib.sha256(data).hexdigest()
            )
        complete = manifest.model_copy(update={"format_version": FORMAT_VERSION, "payloads": payloads})
        (staging / MANIFEST_FILE).write_text(complete.model_dump_json(indent=2) + "\n")
        for file in staging.iterdir():
            os.chmod(file, 0o644)
        written = load_artifact(staging)  # the gateway's reader, before anything is swapped in
        for dtype in WIRE_DTYPES:
            written.payload(dtype)
    return target


def read_tensors(artifact: Artifact | str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The artifact's tensors (CPU), `soft_prompt` first among them."""
    folder = artifact.folder if isinstance(artifact, Artifact) else load_artifact(artifact).folder
    return load_file(str(folder / TENSORS_FILE))


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
    except Exception as exc:  # safetensors raises its own error types
        raise ArtifactError(f"{released_file}: unreadable safetensors: {exc}") from None
    if set(tensors) != {RELEASED_KEY}:
        raise ArtifactError(f"{released_file}: expected exactly one tensor '{RELEASED_KEY}', found {sorted(tensors)}")
    soft = tensors[RELEASED_KEY]
    if soft.ndim != 2 or not soft.is_floating_point():
        raise ArtifactError(
            f"{released_file}: '{RELEASED_KEY}' must be a float [n, hidden], got {tuple(soft.shape)} {soft.dtype}"
        )
    manifest = Manifest(
        name=name,
        base_model=base_model,
        hidden_size=int(soft.shape[1]),
        num_virtual_tokens=int(soft.shape[0]),
        chat_template_sha256=model.chat_template_sha256,
        dtype=dtype_name(soft.dtype),
        origin="paper-release",
        init_prompt=init_prompt,
        notes=f"imported from {Path(released_file).name}",
    )
    if manifest.hidden_size != model.hidden_size:
        raise ArtifactError(
            f"{released_file}: hidden size {manifest.hidden_size}, but model '{model.name}' has "
            f"hidden size {model.hidden_size}"
        )
    return manifest, {SOFT_PROMPT_KEY: soft}


def convert_artifact(path: str | os.PathLike[str]) -> Path:
    """Bring an artifact of an earlier format (1: no payloads) to the current one, in place (atomic).

    The tensors and every manifest field are kept; the payloads are written from the stored soft
    prompt, exactly as the trainer's export writes them. An artifact already current is rewritten
    the same way (its payloads recomputed), so the command is safe to repeat.
    """
    folder = Path(path)
    manifest_path, tensors_path = folder / MANIFEST_FILE, folder / TENSORS_FILE
    raw = read_raw_manifest(folder)
    version = raw.get("format_version")
    if version not in (1, FORMAT_VERSION):
        raise ArtifactError(
            f"{manifest_path}: format_version {version!r}; this trainer converts 1 and {FORMAT_VERSION}"
        )
    raw.pop("payloads", None)
    try:
        manifest = Manifest.model_validate({**raw, "format_version": FORMAT_VERSION})
        tensors = load_file(str(tensors_path))
    except Exception as exc:  # pydantic's ValidationError, safetensors' own errors
        raise ArtifactError(f"{folder}: cannot convert: {exc}") from None
    return save_artifact(folder, manifest, tensors)
