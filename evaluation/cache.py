"""The run directory's append-only result caches: what makes a run resumable.

Every finished request appends one JSON line, keyed by (set, query index, variant, sample), to
`answers.jsonl` (model answers) or `guard.jsonl` (harm-judge verdicts). A rerun loads the file
and skips every key already there. A line cut short by a kill is the only damage an interrupted
append can do; it is cut off on load (its request is simply redone). The run's generation
fingerprint lives in `run.json`; a directory is refused under different generation settings.
This module knows nothing about HTTP or metrics.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, Iterator

from safeprompt.files import atomic_write_text

Key = tuple[str, int, str, str]  # (set, query index, variant, sample: "greedy" or "0", "1", ...)
RUN_FILE = "run.json"


class CacheError(ValueError):
    """A run directory that does not belong to this run, or a damaged cache."""


def bind_run_dir(run_dir: Path, fingerprint: dict[str, Any]) -> bool:
    """Create `run_dir` for this fingerprint, or check that an existing one matches.

    Returns True when the directory already held a run (a resume). Raises CacheError naming the
    settings that differ otherwise.
    """
    run_file = run_dir / RUN_FILE
    if run_file.is_file():
        stored = json.loads(run_file.read_text())
        differing = sorted(key for key in set(stored) | set(fingerprint) if stored.get(key) != fingerprint.get(key))
        if differing:
            details = "; ".join(f"{key}: run dir has {stored.get(key)!r}, now {fingerprint.get(key)!r}"
                                for key in differing)
            raise CacheError(f"{run_dir} holds a run with other generation settings ({details}); "
                             "use a new --run-dir")
        return True
    atomic_write_text(run_file, json.dumps(fingerprint, indent=2, sort_keys=True) + "\n")
    return False


def record_key(record: dict[str, Any]) -> Key:
    return (record["set"], int(record["query_index"]), record["variant"], str(record["sample"]))


class ResultCache:
    """One JSONL file of records, each with the key fields `set`, `query_index`, `variant`, `sample`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._records: dict[Key, dict[str, Any]] = {}
        self.ignored_lines = 0
        if path.is_file():
            self._load()

    def _load(self) -> None:
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        offset = 0
        for number, line in enumerate(lines, start=1):
            start, offset = offset, offset + len(line) + 1
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                key = record_key(record)
            except (ValueError, KeyError, TypeError):
                if number == len(lines) or (number == len(lines) - 1 and not lines[-1]):
                    # The last line, cut short by an interrupted append: drop it from the file, so
                    # the next append starts on a clean line and the request is simply redone.
                    self.ignored_lines += 1
                    with open(self.path, "r+b") as handle:
                        handle.truncate(start)
                    break
                raise CacheError(f"{self.path}:{number}: damaged line in the middle of the cache") from None
            self._records[key] = record
        else:
            if data and not data.endswith(b"\n"):
                # A complete record without its newline (killed between write and newline).
                with open(self.path, "ab") as handle:
                    handle.write(b"\n")

    def __contains__(self, key: Key) -> bool:
        return key in self._records

    def __len__(self) -> int:
        return len(self._records)

    def get(self, key: Key) -> dict[str, Any] | None:
        return self._records.get(key)

    def records(self) -> Iterator[dict[str, Any]]:
        return iter(list(self._records.values()))

    def append(self, record: dict[str, Any]) -> None:
        """Append one record (thread-safe); flushed to the OS before returning."""
        key = record_key(record)
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(line)
                handle.flush()
            self._records[key] = record
