"""Draw the Qwen2.5-Coder-0.5B-Instruct answers to label, and their dev/test split, reproducibly.

Reads evaluation answer files (`answers.jsonl` of `dro-eval` runs: set, query_index, variant, sample,
query_sha256, text, ...), keeps the first answer of each distinct text within a (set, variant)
stratum, draws up to `--per-variant` rows per text-variant stratum and `--per-dro` per DRO stratum
with `random.Random(--seed)`, and puts a seeded random half of each stratum into `test`. Writes
unlabelled rows (`refusal: null`) in labels.jsonl's format; the labels are added by reading each
answer (README.md). The split is drawn here, before any label or rule, so no rule can choose it.

    PYTHONPATH=. .venv/bin/python data/judge_labels/sample_qwen.py /work/runs/eval-qwen/answers.jsonl \
        /work/runs/eval-qwen-dro/answers.jsonl --out /tmp/qwen_unlabelled.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from collections import defaultdict
from pathlib import Path

from evaluation.querysets import load_builtin_set
from safeprompt.files import sha256_text

GROUP = "qwen25coder05b"
MODEL = "qwen2.5-coder-0.5b-instruct"


def read_answers(paths: list[Path]) -> dict[tuple[str, str], list[dict]]:
    """Greedy answers by (set, variant), one per distinct text, in file order."""
    strata: dict[tuple[str, str], list[dict]] = defaultdict(list)
    seen: set[tuple[str, str, str]] = set()
    for path in paths:
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            key = (row["set"], row["variant"], row["text"])
            if row["sample"] != "greedy" or key in seen:
                continue
            seen.add(key)
            strata[(row["set"], row["variant"])].append(row)
    return strata


def draw(strata: dict[tuple[str, str], list[dict]], per_variant: int, per_dro: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    queries = {name: load_builtin_set(name).queries for name in sorted({name for name, _ in strata})}
    out = []
    for (set_name, variant) in sorted(strata):
        rows = sorted(strata[(set_name, variant)], key=lambda row: row["query_index"])
        chosen = rng.sample(rows, min(len(rows), per_dro if variant == "dro" else per_variant))
        chosen.sort(key=lambda row: row["query_index"])
        test_positions = set(rng.sample(range(len(chosen)), len(chosen) // 2 + rng.randint(0, len(chosen) % 2)))
        for position, row in enumerate(chosen):
            query = queries[set_name][row["query_index"]]
            if sha256_text(query)[:16] != row["query_sha256"]:
                raise ValueError(f"{set_name}[{row['query_index']}]: query text does not match the answer file")
            out.append({
                "id": f"{GROUP}-{set_name}-{variant}-{row['query_index']:03d}",
                "split": "test" if position in test_positions else "dev",
                "group": GROUP, "source": set_name, "model": MODEL, "condition": variant,
                "prompt": query, "response": row["text"], "refusal": None, "partial": False, "note": "",
            })
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("answers", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--per-variant", type=int, default=7)
    parser.add_argument("--per-dro", type=int, default=20)
    parser.add_argument("--seed", type=int, default=20261202)
    args = parser.parse_args()
    rows = draw(read_answers(args.answers), args.per_variant, args.per_dro, args.seed)
    args.out.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    print(f"{len(rows)} rows, {sum(row['split'] == 'test' for row in rows)} test -> {args.out}")


if __name__ == "__main__":
    main()
