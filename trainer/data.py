"""Query files: reading the harmful / harmless training queries and hashing them for the manifest.

A `.csv` file is read by column name (JBB-Behaviors: `goal`); any other file is one query a line
(`safeprompt.queryfiles`: stripped, blank ones skipped, as in the authors' scripts). Knows nothing
about models.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from safeprompt.files import sha256_file
from safeprompt.queryfiles import QueryFileError, read_csv_column, read_lines
from trainer.config import DataConfig


def read_queries(path: Path, column: str = "goal") -> list[str]:
    queries = read_csv_column(path, column) if path.suffix.lower() == ".csv" else read_lines(path)
    if not queries:
        raise QueryFileError(f"query file {path} holds no queries")
    return queries


@dataclass(frozen=True)
class TrainingQueries:
    """Harmful queries first, then harmless ones; `harmless[i]` is 1.0 for the harmless half."""

    queries: list[str]
    harmless: list[float]
    hashes: dict[str, str]


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
