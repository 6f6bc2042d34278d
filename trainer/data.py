"""Query files: reading the harmful / harmless training queries and hashing them for the manifest.

A `.csv` file is read by column name (JBB-Behaviors: `goal`); any other file is one query a line.
Blank lines are skipped and queries are stripped, as in the authors' scripts. Knows nothing about
models.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from trainer.config import DataConfig
from safeprompt.files import sha256_file


class QueryFileError(ValueError):
    """A query file is missing, empty, or malformed."""


def read_queries(path: Path, column: str = "goal") -> list[str]:
    if not path.is_file():
        raise QueryFileError(f"query file {path} does not exist")
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None or column not in reader.fieldnames:
                raise QueryFileError(f"{path}: no column {column!r} (columns: {reader.fieldnames})")
            queries = [(row[column] or "").strip() for row in reader]
    else:
        queries = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    queries = [q for q in queries if q]
    if not queries:
        raise QueryFileError(f"query file {path} holds no queries")
    return queries


@dataclass(frozen=True)
class TrainingQueries:
    """Harmful queries first, then harmless ones; `harmless[i]` is 1.0 for the harmless half."""

    queries: list[str]
    harmless: list[float]
    hashes: dict[str, str]

    @property
    def num_harmful(self) -> int:
        return len(self.queries) - int(sum(self.harmless))


def load_training_queries(config: DataConfig) -> TrainingQueries:
    harmful = read_queries(config.harmful_file, config.column)
    harmless = read_queries(config.harmless_file, config.column)
    if config.limit is not None:
        harmful, harmless = harmful[: config.limit], harmless[: config.limit]
    if len(harmful) != len(harmless):
        raise QueryFileError(
            f"{config.harmful_file} has {len(harmful)} queries but {config.harmless_file} has {len(harmless)}; "
            "DRO pairs harmful and harmless queries one to one")
    hashes = {f"harmful:{config.harmful_file.name}": sha256_file(config.harmful_file),
              f"harmless:{config.harmless_file.name}": sha256_file(config.harmless_file)}
    return TrainingQueries(harmful + harmless, [0.0] * len(harmful) + [1.0] * len(harmless), hashes)
