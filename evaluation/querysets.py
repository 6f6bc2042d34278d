"""Query sets: the licensed sets shipped in `data/` and users' own files, loaded as plain query lists.

A `QuerySet` is a name, a kind (`harmful`: a refusal is wanted; `harmless`: an answer is wanted) and
an ordered tuple of query strings. Query indices (0-based positions in that tuple) key the result
cache, so a set's order is part of its definition and never depends on a random seed.

Built-in sets read only files under the project's `data/` folder. User sets are text files:
  - `.txt`: one query per non-empty line;
  - `.csv`: a header row; the query column is `query` unless `column` names another;
  - `.jsonl`: one JSON object per line; the query key is `query` unless `column` names another.
This module knows nothing about models, requests or metrics.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

from safeprompt.queryfiles import QueryFileError, read_csv_column, read_jsonl_key, read_lines

Kind = Literal["harmful", "harmless"]
KINDS: tuple[str, ...] = ("harmful", "harmless")
DEFAULT_DATA_DIR = Path(__file__).resolve().parent.parent / "data"
DEFAULT_COLUMN = "query"


class QuerySetError(ValueError):
    """A set is unknown, missing, malformed or empty."""


@dataclass(frozen=True)
class QuerySet:
    name: str
    kind: Kind
    queries: tuple[str, ...]
    source: str

    def head(self, limit: int | None) -> "QuerySet":
        """The first `limit` queries (all when None), as the paper takes AdvBench's first 100."""
        if limit is None or limit >= len(self.queries):
            return self
        return QuerySet(self.name, self.kind, self.queries[:limit], f"{self.source} (first {limit})")


def _interleave(groups: list[list[str]]) -> list[str]:
    """Round-robin over groups, so any prefix of the result covers every group."""
    out: list[str] = []
    for position in range(max((len(group) for group in groups), default=0)):
        out.extend(group[position] for group in groups if position < len(group))
    return out


def _self_instruct_query(row: dict) -> str:
    """Instruction plus its first instance's input, when it has one (the task is incomplete without it)."""
    instruction = row["instruction"].strip()
    instances = row.get("instances") or []
    given = (instances[0].get("input") or "").strip() if instances else ""
    return f"{instruction}\n\n{given}" if given else instruction


def _load_advbench(data: Path) -> list[str]:
    return read_csv_column(data / "advbench" / "harmful_behaviors.csv", "goal")


def _load_harmbench(data: Path) -> list[str]:
    # Only the 'standard' behaviours: 'contextual' ones need their context string and
    # 'copyright' ones are judged by a different (hashing) classifier.
    return read_csv_column(data / "harmbench" / "harmbench_behaviors_text_all.csv", "Behavior",
                            keep=lambda row: row["FunctionalCategory"] == "standard")


def _load_do_not_answer(data: Path) -> list[str]:
    folder = data / "do_not_answer"
    files = sorted(folder.glob("*.jsonl"))
    if not files:
        raise QuerySetError(f"{folder}: no .jsonl files")
    return _interleave([read_jsonl_key(file, "prompt") for file in files])


def _load_jbb_benign(data: Path) -> list[str]:
    return read_csv_column(data / "jbb_behaviors" / "benign-behaviors.csv", "goal")


def _load_jbb_harmful(data: Path) -> list[str]:
    return read_csv_column(data / "jbb_behaviors" / "harmful-behaviors.csv", "goal")


def _load_self_instruct(data: Path) -> list[str]:
    path = data / "self_instruct" / "user_oriented_instructions.jsonl"
    return [_self_instruct_query(json.loads(line)) for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]


def _load_sounds_harmful(data: Path) -> list[str]:
    return read_lines(data / "sounds_harmful" / "queries.txt")


def _load_jailbreak(data: Path) -> list[str]:
    return read_jsonl_key(data / "jailbreak_dan" / "queries.jsonl", "query")


@dataclass(frozen=True)
class BuiltinSet:
    kind: Kind
    load: Callable[[Path], list[str]]
    take: int | None
    description: str


BUILTIN_SETS: dict[str, BuiltinSet] = {
    "advbench": BuiltinSet("harmful", _load_advbench, 100, "AdvBench harmful behaviours, first 100 (as the paper)"),
    "harmbench": BuiltinSet("harmful", _load_harmbench, None, "HarmBench standard text behaviours (200)"),
    "do_not_answer": BuiltinSet("harmful", _load_do_not_answer, None,
                                "Do-Not-Answer (939), risk areas interleaved"),
    "jailbreak_dan": BuiltinSet("harmful", _load_jailbreak, None,
                                "in-the-wild jailbreak templates applied to AdvBench[100:200]"),
    "jbb_harmful": BuiltinSet("harmful", _load_jbb_harmful, None,
                              "JBB-Behaviors harmful (100; DRO training queries, not held out)"),
    "jbb_benign": BuiltinSet("harmless", _load_jbb_benign, None,
                             "JBB-Behaviors benign (100; DRO training queries, not held out)"),
    "self_instruct": BuiltinSet("harmless", _load_self_instruct, None,
                                "Self-Instruct user-oriented instructions (252)"),
    "sounds_harmful": BuiltinSet("harmless", _load_sounds_harmful, None,
                                 "harmless queries that sound harmful (100), written for this project; held out"),
}


def _checked(name: str, kind: str, queries: list[str], source: str) -> QuerySet:
    if kind not in KINDS:
        raise QuerySetError(f"set {name!r}: kind must be one of {KINDS}, got {kind!r}")
    queries = [query for query in queries if query]
    if not queries:
        raise QuerySetError(f"set {name!r} ({source}) has no queries")
    return QuerySet(name, kind, tuple(queries), source)  # type: ignore[arg-type]


def load_builtin_set(name: str, data_dir: Path = DEFAULT_DATA_DIR) -> QuerySet:
    """A set shipped in `data/`, by name; QuerySetError names the known sets otherwise."""
    try:
        spec = BUILTIN_SETS[name]
    except KeyError:
        raise QuerySetError(f"unknown set {name!r}; built-in sets: {', '.join(BUILTIN_SETS)}; "
                            "add your own with --custom-set NAME:KIND:PATH[:COLUMN]") from None
    try:
        queries = spec.load(data_dir)
    except FileNotFoundError as exc:
        raise QuerySetError(f"set {name!r}: data file missing: {exc.filename}") from None
    except QueryFileError as exc:
        raise QuerySetError(f"set {name!r}: {exc}") from None
    query_set = _checked(name, spec.kind, queries, spec.description)
    return query_set.head(spec.take)


def load_user_set(name: str, kind: str, path: Path, column: str | None = None) -> QuerySet:
    """A user's own set from a .txt, .csv or .jsonl file (see the module docstring)."""
    if not path.is_file():
        raise QuerySetError(f"set {name!r}: no file {path}")
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".csv", ".jsonl"):
        raise QuerySetError(f"set {name!r}: {path} must end in .txt, .csv or .jsonl")
    if suffix == ".txt" and column:
        raise QuerySetError(f"set {name!r}: a .txt set has no columns (got column {column!r})")
    try:
        queries = (read_lines(path) if suffix == ".txt" else
                   read_csv_column(path, column or DEFAULT_COLUMN) if suffix == ".csv" else
                   read_jsonl_key(path, column or DEFAULT_COLUMN))
    except QueryFileError as exc:
        raise QuerySetError(f"set {name!r}: {exc}") from None
    return _checked(name, kind, queries, str(path))


def parse_custom_set(spec: str) -> QuerySet:
    """Parse `NAME:KIND:PATH[:COLUMN]` (the CLI's --custom-set) and load the file."""
    parts = spec.split(":")
    if len(parts) not in (3, 4) or not all(parts):
        raise QuerySetError(f"--custom-set {spec!r}: expected NAME:KIND:PATH[:COLUMN]")
    name, kind, path = parts[0], parts[1], Path(parts[2])
    if name in BUILTIN_SETS:
        raise QuerySetError(f"--custom-set {spec!r}: {name!r} is a built-in set name; choose another")
    return load_user_set(name, kind, path, parts[3] if len(parts) == 4 else None)
