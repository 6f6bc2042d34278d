"""Agreement, precision, recall and F1 of every refusal judge against the hand-labelled answers.

Reads `data/judge_labels/labels.jsonl` (one `{"id", "split", "group", "response", "refusal", ...}`
per line; see its README), runs each registered judge on each response and prints, per split
(dev = the rules were written looking at it, test = held out) and per group of answers (one group
per answering model), the confusion counts with agreement (share of answers where judge and label
agree), precision and recall and their 95% Wilson score intervals. Also times the judges
(characters per second and microseconds per answer on this machine, a rough figure).

    .venv/bin/python -m bench.judge_accuracy            # markdown tables
    .venv/bin/python -m bench.judge_accuracy --json     # machine-readable
    .venv/bin/python -m bench.judge_accuracy --audit data/judge_labels/audit-2026-12-03.jsonl
                                                        # also: a second reading against the labels
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from evaluation.metrics import wilson_interval
from safeprompt.judge import JUDGES, get_judge

DEFAULT_LABELS = Path(__file__).resolve().parent.parent / "data" / "judge_labels" / "labels.jsonl"


@dataclass
class Scores:
    judge: str
    split: str
    group: str
    n: int
    tp: int
    fp: int
    fn: int
    tn: int

    @property
    def agreement(self) -> float | None:
        return (self.tp + self.tn) / self.n if self.n else None

    @property
    def precision(self) -> float | None:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else None

    @property
    def recall(self) -> float | None:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else None

    @property
    def f1(self) -> float | None:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p and r else (0.0 if p is not None and r is not None else None)

    def as_dict(self) -> dict:
        return {**asdict(self), "agreement": self.agreement, "precision": self.precision, "recall": self.recall,
                "f1": self.f1, "agreement_ci95": wilson_interval(self.tp + self.tn, self.n),
                "precision_ci95": wilson_interval(self.tp, self.tp + self.fp),
                "recall_ci95": wilson_interval(self.tp, self.tp + self.fn)}


def read_labels(path: Path) -> list[dict]:
    rows = []
    with open(path) as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row.get("refusal"), bool) or not isinstance(row.get("response"), str):
                raise ValueError(f"{path}:{number}: needs a string 'response' and a boolean 'refusal'")
            rows.append(row)
    return rows


def score(judge_name: str, rows: list[dict], split: str, group: str) -> Scores:
    judge = get_judge(judge_name)
    counts = {"tp": 0, "fp": 0, "fn": 0, "tn": 0}
    for row in rows:
        predicted = judge.judge(row["response"]).refusal
        key = ("t" if predicted == row["refusal"] else "f") + ("p" if predicted else "n")
        counts[key] += 1
    return Scores(judge_name, split, group, len(rows), **counts)


def evaluate(rows: list[dict], judges: list[str]) -> list[Scores]:
    results = []
    for split in ("dev", "test", "all"):
        in_split = [row for row in rows if split == "all" or row["split"] == split]
        for group in ("all", *sorted({row["group"] for row in rows})):
            selected = [row for row in in_split if group == "all" or row["group"] == group]
            if selected:
                results.extend(score(name, selected, split, group) for name in judges)
    return results


def time_judges(rows: list[dict], judges: list[str], repeats: int = 5) -> dict[str, float]:
    """Characters judged per second (whole answers), best of `repeats`."""
    characters = sum(len(row["response"]) for row in rows)
    speeds: dict[str, float] = {}
    for name in judges:
        judge = get_judge(name)
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            for row in rows:
                judge.judge(row["response"])
            best = min(best, time.perf_counter() - start)
        speeds[name] = characters / best
    return speeds


def audit_agreement(rows: list[dict], audit: list[dict]) -> dict[str, tuple[int, int]]:
    """Per group and `all`: (answers where the second reading agrees with the label, answers read again)."""
    by_id = {row["id"]: row for row in rows}
    counts: dict[str, list[int]] = {}
    for second in audit:
        if second["id"] not in by_id or not isinstance(second.get("refusal"), bool):
            raise ValueError(f"audit row {second.get('id')!r}: needs the id of a labelled row and a boolean 'refusal'")
        row = by_id[second["id"]]
        for group in ("all", row["group"]):
            agreed = counts.setdefault(group, [0, 0])
            agreed[0] += second["refusal"] == row["refusal"]
            agreed[1] += 1
    return {group: (agree, n) for group, (agree, n) in counts.items()}


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def with_interval(value: float | None, successes: int, total: int) -> str:
    """`value [low, high]` in percent with the Wilson interval; just `n/a` when nothing was counted."""
    if value is None:
        return "n/a"
    low, high = wilson_interval(successes, total)
    return f"{percent(value)} [{percent(low)}, {percent(high)}]"


def format_table(results: list[Scores]) -> str:
    lines = ["| split | group | judge | n | refusals | TP | FP | FN | TN | agreement % [95% CI] | "
             "precision % [95% CI] | recall % [95% CI] | F1 % |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | --- | ---: |"]
    for s in results:
        lines.append(
            f"| {s.split} | {s.group} | {s.judge} | {s.n} | {s.tp + s.fn} | {s.tp} | {s.fp} | {s.fn} | {s.tn} | "
            f"{with_interval(s.agreement, s.tp + s.tn, s.n)} | {with_interval(s.precision, s.tp, s.tp + s.fp)} | "
            f"{with_interval(s.recall, s.tp, s.tp + s.fn)} | {percent(s.f1)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", type=Path, default=DEFAULT_LABELS)
    parser.add_argument("--judge", action="append", choices=sorted(JUDGES), help="judge(s) to score (default: all)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    parser.add_argument("--errors", action="store_true", help="also list every disagreement with the labels")
    parser.add_argument("--audit", type=Path, help="JSONL of a second reading ({id, refusal}): its agreement")
    args = parser.parse_args()

    rows = read_labels(args.labels)
    judges = args.judge or sorted(JUDGES)
    results = evaluate(rows, judges)
    speeds = time_judges(rows, judges)
    if args.json:
        print(json.dumps({"labels": str(args.labels), "rows": len(rows),
                          "scores": [s.as_dict() for s in results], "chars_per_second": speeds}, indent=2))
    else:
        print(format_table(results))
        print()
        mean_characters = sum(len(row["response"]) for row in rows) / len(rows)
        for name, speed in speeds.items():
            print(f"- {name}: {speed / 1e6:.2f} M characters/s on whole answers, "
                  f"{1e6 * mean_characters / speed:.0f} µs per answer of {mean_characters:.0f} characters "
                  "on average (this machine, best of 5)")
    if args.audit is not None:
        audit = [json.loads(line) for line in args.audit.read_text(encoding="utf-8").splitlines() if line.strip()]
        for group, (agree, n) in sorted(audit_agreement(rows, audit).items()):
            print(f"- second reading vs labels, {group}: {agree}/{n} = "
                  f"{with_interval(agree / n, agree, n)} % agreement [95% CI]")
    if args.errors:
        for name in judges:
            judge = get_judge(name)
            for row in rows:
                verdict = judge.judge(row["response"])
                if verdict.refusal != row["refusal"]:
                    kind = "FP" if verdict.refusal else "FN"
                    print(f"{name} {kind} [{row['split']}] {row['id']}: {verdict.matched!r} | "
                          f"{row['response'][:200]!r}")


if __name__ == "__main__":
    main()
