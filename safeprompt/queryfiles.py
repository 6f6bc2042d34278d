"""Reading query files: a CSV column, a JSONL key, or one query a line.

Every reader returns the queries in file order, stripped, with empty ones dropped (as the DRO
authors' scripts read them), and raises `QueryFileError` naming the file for a missing file, a
missing column or key, or a malformed line. What a file *means* (harmful or harmless, which
column, how many) is the caller's: the trainer's `data` config, the evaluation's query sets.
Knows nothing about models or requests.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path


class QueryFileError(ValueError):
    """A query file is missing or malformed."""


def _check_exists(path: Path) -> None:
    if not path.is_file():
        raise QueryFileError(f"query file {path} does not exist")


def read_csv_column(path: Path, column: str, keep: Callable[[dict[str, str]], bool] | None = None) -> list[str]:
    """The non-empty values of `column`, from the rows `keep` accepts (all when None)."""
    _check_exists(path)
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or column not in reader.fieldnames:
            raise QueryFileError(f"{path}: no column {column!r} (columns: {reader.fieldnames})")
        values = [(row[column] or "").strip() for row in reader if keep is None or keep(row)]
    return [value for value in values if value]


def read_jsonl_key(path: Path, key: str) -> list[str]:
    """The non-empty string values of `key`, one JSON object a non-blank line."""
    _check_exists(path)
    queries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise QueryFileError(f"{path}:{number}: not JSON: {exc}") from None
        if not isinstance(row, dict) or not isinstance(row.get(key), str):
            raise QueryFileError(f"{path}:{number}: no string field {key!r}")
        queries.append(row[key].strip())
    return [query for query in queries if query]


def read_lines(path: Path) -> list[str]:
    """One query a non-blank line."""
    _check_exists(path)
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
