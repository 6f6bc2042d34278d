"""Atomic writes (safeprompt/files.py): all or nothing, and readable by a server running as another user."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from safeprompt.files import atomic_directory, atomic_write_text


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_finished_directory_is_world_readable_whatever_its_writer_made(tmp_path: Path) -> None:
    target = tmp_path / "model"
    with atomic_directory(target) as staging:
        secret = os.open(staging / "model.safetensors", os.O_WRONLY | os.O_CREAT, 0o600)  # as transformers does
        os.write(secret, b"weights")
        os.close(secret)
        (staging / "sub").mkdir(mode=0o700)
        (staging / "sub" / "a.json").write_text("{}")
    assert _mode(target) == 0o755 and _mode(target / "sub") == 0o755
    assert _mode(target / "model.safetensors") == 0o644 and _mode(target / "sub" / "a.json") == 0o644
    assert (target / "model.safetensors").read_bytes() == b"weights"


def test_a_failed_directory_leaves_the_old_one_and_no_staging(tmp_path: Path) -> None:
    target = tmp_path / "artifact"
    with atomic_directory(target) as staging:
        (staging / "v").write_text("1")
    with pytest.raises(RuntimeError), atomic_directory(target) as staging:
        (staging / "v").write_text("2")
        raise RuntimeError("writer failed")
    assert (target / "v").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]


def test_atomic_write_replaces_whole_and_world_readable(tmp_path: Path) -> None:
    path = tmp_path / "labels.json"
    atomic_write_text(path, "old")
    atomic_write_text(path, "new")
    assert path.read_text() == "new" and _mode(path) == 0o644 and [p.name for p in tmp_path.iterdir()] == [path.name]
