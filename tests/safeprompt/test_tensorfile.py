"""The safetensors header read without torch (safeprompt/tensorfile.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from safeprompt.tensorfile import TensorFileError, read_header


def test_header_agrees_with_the_tensors(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    tensors = {"soft_prompt": torch.randn(3, 16).bfloat16(), "bias": torch.tensor(0.5), "w": torch.randn(16, 4)}
    save_file(tensors, str(path), metadata={"format": "pt"})
    header = read_header(path)
    assert {name: (info.dtype, info.shape) for name, info in header.items()} == {
        "soft_prompt": ("bfloat16", (3, 16)), "bias": ("float32", ()), "w": ("float32", (16, 4))}
    raw = path.read_bytes()
    soft = header["soft_prompt"]
    assert raw[soft.begin:soft.end] == tensors["soft_prompt"].view(torch.int16).numpy().tobytes()


def _write(path: Path, header: dict, data: bytes) -> Path:
    encoded = json.dumps(header).encode()
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + data)
    return path


@pytest.mark.parametrize(("header", "data", "message"), [
    ({"x": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 64]}}, b"\0" * 16, "byte range"),
    ({"x": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 8]}}, b"\0" * 16, "byte range"),
    ({"x": {"dtype": "I64", "shape": [2], "data_offsets": [0, 16]}}, b"\0" * 16, "dtype 'I64'"),
    ({"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "malformed shape"),
    ({"x": {"dtype": "F32", "shape": [1]}}, b"\0" * 4, "malformed header entry"),
])
def test_a_header_that_lies_is_refused(tmp_path: Path, header: dict, data: bytes, message: str) -> None:
    with pytest.raises(TensorFileError, match=message):
        read_header(_write(tmp_path / "t.safetensors", header, data))


def test_garbage_is_refused(tmp_path: Path) -> None:
    (tmp_path / "short").write_bytes(b"abc")
    (tmp_path / "huge").write_bytes((10**12).to_bytes(8, "little") + b"{}")
    (tmp_path / "notjson").write_bytes((3).to_bytes(8, "little") + b"{x}")
    for name in ("short", "huge", "notjson"):
        with pytest.raises(TensorFileError):
            read_header(tmp_path / name)
