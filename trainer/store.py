"""The run directory: atomic JSON / safetensors writes and stage-completion records.

Every stage writes its outputs atomically (temp file + rename) and then a `<stage>.done.json`
holding the stage's config fingerprint; a later run skips the stage when that record matches, so
each stage resumes from its outputs. Knows nothing about what the stages compute.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from safeprompt.files import atomic_write, sha256_text


def write_json(path: Path, data: Any) -> None:
    atomic_write(path, lambda temp: Path(temp).write_text(json.dumps(data, indent=2, default=str) + "\n"))


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    atomic_write(path, lambda temp: save_file(
        {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, temp))


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the stage that writes it first")
    return load_file(str(path))


def fingerprint(data: Any) -> str:
    return sha256_text(json.dumps(data, sort_keys=True, default=str))


def stage_done(run_dir: Path, stage: str, key: Any) -> bool:
    record = run_dir / f"{stage}.done.json"
    return record.is_file() and read_json(record).get("fingerprint") == fingerprint(key)


def mark_done(run_dir: Path, stage: str, key: Any, seconds: float) -> None:
    write_json(run_dir / f"{stage}.done.json", {"fingerprint": fingerprint(key), "seconds": seconds})


def stage_seconds(run_dir: Path, stage: str) -> float | None:
    record = run_dir / f"{stage}.done.json"
    return read_json(record).get("seconds") if record.is_file() else None
