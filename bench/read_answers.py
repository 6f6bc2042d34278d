"""Print greedy answers of two variants side by side from a dro-eval run directory, for reading by hand.

  PYTHONPATH=. .venv/bin/python bench/read_answers.py RUN_DIR --sets sounds_harmful,self_instruct \
      --variants none,dro --count 10 --seed 0

Picks `--count` queries per set at random (seeded) among those both variants answered, and prints the
query, each variant's answer, its finish reason and the refusal judge's verdict. The rules used to
read them are in docs/trainer.md ("Reading answers").
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from evaluation.querysets import load_builtin_set
from safeprompt.judge import DEFAULT_JUDGE, get_judge


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--sets", required=True)
    parser.add_argument("--variants", required=True)
    parser.add_argument("--count", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    judge = get_judge(DEFAULT_JUDGE)
    variants = args.variants.split(",")
    answers: dict[tuple[str, int, str], dict] = {}
    for line in (args.run_dir / "answers.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["sample"] == "greedy":
            answers[(record["set"], record["query_index"], record["variant"])] = record
    rng = random.Random(args.seed)
    for name in args.sets.split(","):
        queries = load_builtin_set(name).queries
        indices = sorted({i for (s, i, _) in answers if s == name
                          and all((s, i, v) in answers for v in variants)})
        for index in sorted(rng.sample(indices, min(args.count, len(indices)))):
            print(f"=== {name} #{index}: {queries[index]}")
            for variant in variants:
                record = answers[(name, index, variant)]
                verdict = "REFUSAL" if judge.judge(record["text"]).refusal else "answer"
                print(f"--- {variant} [{record.get('finish_reason')}, {verdict}, {len(record['text'].split())} words]")
                print(record["text"].strip())
            print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
