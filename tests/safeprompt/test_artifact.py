"""The artifact format: written with its serving payloads (safeprompt/artifact_write.py), read and
checked without torch (safeprompt/artifact.py), older artifacts converted in place."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from safeprompt.artifact import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    TENSORS_FILE,
    ArtifactError,
    Manifest,
    load_artifact,
    payload_file_name,
)
from safeprompt.artifact_write import convert_artifact, read_tensors, save_artifact
from safeprompt.embeds import WIRE_DTYPES
from safeprompt.torch_payload import TORCH_DTYPES

ROOT = Path(__file__).resolve().parents[2]
NO_TORCH = ROOT / "tests" / "no_torch"


def _manifest(rows: int = 4, hidden: int = 32, dtype: str = "float32") -> Manifest:
    return Manifest(name="dro", base_model="m", hidden_size=hidden, num_virtual_tokens=rows,
                    chat_template_sha256=None, dtype=dtype, origin="test")


def _save(tmp_path: Path, soft: torch.Tensor | None = None, name: str = "a") -> tuple[Path, torch.Tensor]:
    soft = torch.randn(4, 32) if soft is None else soft
    extra = {"pca_mean": torch.randn(32), "refusal_bias": torch.tensor(0.25)}
    manifest = _manifest(*soft.shape, dtype=str(soft.dtype).removeprefix("torch."))
    return save_artifact(tmp_path / name, manifest, {"soft_prompt": soft, **extra}), soft


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16])
def test_every_payload_is_the_stored_soft_prompt_in_its_dtype(tmp_path: Path, stored: torch.dtype) -> None:
    path, soft = _save(tmp_path, torch.randn(4, 32).to(stored))
    artifact = load_artifact(path)
    assert artifact.manifest.format_version == FORMAT_VERSION
    assert set(artifact.manifest.payloads) == set(WIRE_DTYPES)
    assert artifact.tensors["soft_prompt"].shape == (4, 32) and artifact.tensors["refusal_bias"].shape == ()
    for dtype in WIRE_DTYPES:
        data = artifact.payload(dtype)
        assert hashlib.sha256(data).hexdigest() == artifact.manifest.payloads[dtype].sha256
        sent = torch.load(io.BytesIO(data), weights_only=True)
        assert sent.dtype == TORCH_DTYPES[dtype] and torch.equal(sent, soft.to(TORCH_DTYPES[dtype]))
    assert torch.equal(read_tensors(path)["soft_prompt"], soft)


def test_a_payload_changed_on_disk_is_refused(tmp_path: Path) -> None:
    path, _ = _save(tmp_path)
    file = path / payload_file_name("bfloat16")
    data = bytearray(file.read_bytes())
    data[-100] ^= 0x01
    file.write_bytes(bytes(data))
    artifact = load_artifact(path)  # sizes still agree; the hash is checked when the payload is read
    with pytest.raises(ArtifactError, match="does not match the size and sha256"):
        artifact.payload("bfloat16")
    artifact.payload("float32")
    (path / payload_file_name("float16")).unlink()
    with pytest.raises(ArtifactError, match="float16 payload .* is missing"):
        load_artifact(path)


def test_a_manifest_whose_shape_disagrees_with_the_tensors_is_refused(tmp_path: Path) -> None:
    path, _ = _save(tmp_path)
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    (path / MANIFEST_FILE).write_text(json.dumps({**manifest, "num_virtual_tokens": 5}))
    with pytest.raises(ArtifactError, match="does not match the manifest"):
        load_artifact(path)
    (path / MANIFEST_FILE).write_text(json.dumps({**manifest, "dtype": "bfloat16"}))
    with pytest.raises(ArtifactError, match="stored as float32, the manifest says bfloat16"):
        load_artifact(path)


@pytest.mark.parametrize(("soft", "message"), [
    (torch.full((2, 8), 1e6), "overflows float16"),
    (torch.tensor([[1.0, float("nan")]]), "NaN or Inf"),
])
def test_nothing_is_written_for_a_soft_prompt_that_cannot_be_served(tmp_path: Path, soft, message) -> None:
    with pytest.raises(ArtifactError, match=message):
        save_artifact(tmp_path / "bad", _manifest(*soft.shape), {"soft_prompt": soft})
    assert list(tmp_path.iterdir()) == []


def _as_format_1(path: Path) -> dict:
    """What an artifact written before payloads looked like: no payload files, format_version 1."""
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    del manifest["payloads"]
    manifest["format_version"] = 1
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))
    for dtype in WIRE_DTYPES:
        (path / payload_file_name(dtype)).unlink()
    return manifest


def test_a_format_1_artifact_is_refused_with_the_command_that_converts_it(tmp_path: Path) -> None:
    path, soft = _save(tmp_path)
    old = _as_format_1(path)
    tensors_before = (path / TENSORS_FILE).read_bytes()
    with pytest.raises(ArtifactError, match=f"format 1 artifact.*dro-trainer convert-artifact --artifact {path}"):
        load_artifact(path)
    assert convert_artifact(path) == path
    artifact = load_artifact(path)
    assert (path / TENSORS_FILE).read_bytes() == tensors_before
    kept = artifact.manifest.model_dump(mode="json")
    assert {k: v for k, v in kept.items() if k not in ("format_version", "payloads")} == {
        k: v for k, v in old.items() if k != "format_version"}
    sent = torch.load(io.BytesIO(artifact.payload("float32")), weights_only=True)
    assert torch.equal(sent, soft)
    convert_artifact(path)  # a current artifact converts to itself
    assert load_artifact(path).manifest.model_dump(exclude={"payloads"}) == artifact.manifest.model_dump(
        exclude={"payloads"})


def test_the_reader_runs_without_torch(tmp_path: Path) -> None:
    """The gateway's image has no torch: the reader checks and returns payloads without it."""
    path, _ = _save(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(NO_TORCH), str(ROOT)])}
    blocked = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert blocked.returncode != 0 and "torch is blocked" in blocked.stderr
    script = ("import sys; from safeprompt.artifact import load_artifact; a = load_artifact(sys.argv[1]); "
              "print(sorted(len(a.payload(d)) for d in a.manifest.payloads)); "
              "assert not {'torch', 'numpy', 'safetensors'} & set(sys.modules)")
    done = subprocess.run([sys.executable, "-c", script, str(path)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    manifest = load_artifact(path).manifest
    assert done.stdout.strip() == str(sorted(entry.bytes for entry in manifest.payloads.values()))
