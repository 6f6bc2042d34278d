"""Atomic writes and content hashes: a reader sees the old file or directory or the new one, never half.

- `atomic_write(path, write)`: `write(temp_path)` fills a temp file beside `path`; it is fsynced,
  made world-readable (0644) and renamed over `path`.
- `atomic_write_text(path, text)`: the same for a whole text file.
- `atomic_directory(target, keep_existing=False)`: a context manager yielding a staging directory
  beside `target`; on a clean exit its files are fsynced and made world-readable (0644, folders
  0755) and it replaces `target` (any old one is retired first; with
  `keep_existing`, a `target` that another process finished first is kept and the staging dropped),
  on an error it is removed.
- `sha256_file`, `sha256_text`: hex digests (files are read in blocks; model files are large).
Knows nothing about what is written.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        write(temp)
        with open(temp, "rb") as stream:
            os.fsync(stream.fileno())
        os.chmod(temp, 0o644)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda temp: Path(temp).write_text(text, encoding="utf-8"))


@contextlib.contextmanager
def atomic_directory(target: Path, *, keep_existing: bool = False) -> Iterator[Path]:
    """Stage a directory beside `target` and swap it in whole on success (0755, files fsynced)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
        # Readable by a server running as another user (a container's vLLM or gateway): mkdtemp
        # creates 0700, and some writers create 0600 files (transformers' safetensors shards).
        for file in staging.rglob("*"):
            if file.is_file():
                with open(file, "rb") as handle:
                    os.fsync(handle.fileno())
                os.chmod(file, 0o644)
            elif file.is_dir():
                os.chmod(file, 0o755)
        os.chmod(staging, 0o755)
        if target.exists() and keep_existing:
            shutil.rmtree(staging, ignore_errors=True)
        elif target.exists():
            retired = target.with_name(f".{target.name}.old")
            shutil.rmtree(retired, ignore_errors=True)
            os.replace(target, retired)
            os.replace(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def sha256_file(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
