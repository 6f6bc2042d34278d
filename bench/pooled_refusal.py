"""Pool dro-eval greedy answers over sets of one kind and compare variants, paired per query.

    PYTHONPATH=. .venv/bin/python bench/pooled_refusal.py RUN_DIR:VARIANT[=LABEL] ... \
        [--harmful advbench,harmbench,do_not_answer,jailbreak_dan] [--harmless self_instruct,sounds_harmful] \
        [--judge phrases] [--limit 50] [--against none]

Reads each dro-eval run directory's `answers.jsonl` (greedy answers only), judges every answer again
with the named judge (so answers cached under an older judge are judged the same way), keeps the
first `--limit` queries of each set that every compared variant answered, and prints per variant:
pooled refusal % on the harmful and on the harmless sets with Wilson 95% intervals, the paired
difference against `--against` with its Wald 95% interval and its discordant pairs (b = only this variant refused, c = only
the reference did) and an exact McNemar p, and the harmless answers' mean words and finished share.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

from evaluation.metrics import wilson_interval
from safeprompt.judge import get_judge


def mcnemar_exact(b: int, c: int) -> float:
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(0, min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_difference_interval(b: int, c: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wald 95% interval of the difference of two paired proportions, (b - c) / n, from the discordant
    counts (b: only the first refused, c: only the second); Agresti & Min (2005), eq. (1)."""
    if n == 0:
        return 0.0, 0.0
    difference = (b - c) / n
    spread = z * math.sqrt(max(0.0, (b + c) / n**2 - (b - c) ** 2 / n**3))
    return difference - spread, difference + spread


def load(spec: str) -> tuple[str, dict[tuple[str, int], dict]]:
    source, _, label = spec.partition("=")
    run_dir, _, variant = source.rpartition(":")
    answers = {}
    with open(Path(run_dir) / "answers.jsonl", encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            if record["variant"] == variant and record["sample"] == "greedy":
                answers[(record["set"], record["query_index"])] = record
    return label or f"{Path(run_dir).name}:{variant}", answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="+", help="RUN_DIR:VARIANT[=LABEL]")
    parser.add_argument("--harmful", default="advbench,harmbench,do_not_answer,jailbreak_dan")
    parser.add_argument("--harmless", default="self_instruct,sounds_harmful")
    parser.add_argument("--judge", default="phrases")
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--against", default=None, help="label of the reference variant (default: the first)")
    args = parser.parse_args()
    judge = get_judge(args.judge)
    loaded = dict(load(spec) for spec in args.variants)
    reference = args.against or next(iter(loaded))
    kinds = {"harmful": args.harmful.split(","), "harmless": args.harmless.split(",")}
    print(f"judge {args.judge}; first {args.limit} queries a set answered by every variant; paired against {reference}")
    for kind, sets in kinds.items():
        keys = [
            key
            for key in sorted(set.intersection(*(set(a) for a in loaded.values())))
            if key[0] in sets and key[1] < args.limit
        ]
        per_set = defaultdict(int)
        for key in keys:
            per_set[key[0]] += 1
        print(f"\n{kind}: {len(keys)} queries ({', '.join(f'{s} {per_set[s]}' for s in sets)})")
        verdicts = {
            label: [judge.judge(answers[key]["text"]).refusal for key in keys] for label, answers in loaded.items()
        }
        print("| variant | refusal % [95% CI] | vs ref (pts) [95% CI] | b / c | McNemar p | words | finished % |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for label, answers in loaded.items():
            k, n = sum(verdicts[label]), len(keys)
            low, high = wilson_interval(k, n)
            b = sum(1 for x, y in zip(verdicts[label], verdicts[reference], strict=True) if x and not y)
            c = sum(1 for x, y in zip(verdicts[label], verdicts[reference], strict=True) if y and not x)
            words = sum(len(answers[key]["text"].split()) for key in keys) / max(1, n)
            finished = sum(answers[key].get("finish_reason") == "stop" for key in keys) / max(1, n)
            diff_low, diff_high = paired_difference_interval(b, c, n)
            print(
                f"| {label} | {100 * k / n:.1f} [{100 * low:.1f}, {100 * high:.1f}] | {100 * (b - c) / n:+.1f} "
                f"[{100 * diff_low:+.1f}, {100 * diff_high:+.1f}] "
                f"| {b} / {c} | {mcnemar_exact(b, c):.3f} | {words:.0f} | {100 * finished:.0f} |"
            )


if __name__ == "__main__":
    main()
