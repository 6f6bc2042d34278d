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
    .venv/bin/python -m bench.judge_accuracy --model-judge-url http://127.0.0.1:8001 \
        --model-judge-model qwen2.5-coder-0.5b-instruct  # also: a refusal judge model (reads the request)

A refusal judge model (`safeprompt.judge.model_judge`) is scored like the string judges; its verdicts
are cached per row id in `--model-judge-cache` (a rerun sends only what is missing), and an
unreadable verdict counts as "no refusal" (the count is printed).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from evaluation.metrics import wilson_interval
from evaluation.model_judging import verdict_file
from safeprompt.client import ChatClient
from safeprompt.files import sha256_text
from safeprompt.judge import JUDGES, get_judge
from safeprompt.judge.model_judge import ModelJudgeSettings
from safeprompt.model_judge_client import ModelJudgeClient

Predict = Callable[[dict], bool]

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


def string_judge(name: str) -> Predict:
    judge = get_judge(name)
    return lambda row: judge.judge(row["response"]).refusal


def score(judge_name: str, predict: Predict, rows: list[dict], split: str, group: str) -> Scores:
    counts = {"tp": 0, "fp": 0, "fn": 0, "tn": 0}
    for row in rows:
        predicted = predict(row)
        key = ("t" if predicted == row["refusal"] else "f") + ("p" if predicted else "n")
        counts[key] += 1
    return Scores(judge_name, split, group, len(rows), **counts)


def evaluate(rows: list[dict], judges: dict[str, Predict]) -> list[Scores]:
    results = []
    for split in ("dev", "test", "all"):
        in_split = [row for row in rows if split == "all" or row["split"] == split]
        for group in ("all", *sorted({row["group"] for row in rows})):
            selected = [row for row in in_split if group == "all" or row["group"] == group]
            if selected:
                results.extend(score(name, predict, selected, split, group) for name, predict in judges.items())
    return results


def pair_digest(row: dict) -> str:
    return sha256_text(json.dumps([row.get("prompt", ""), row["response"]]))[:16]


def model_verdicts(rows: list[dict], settings: ModelJudgeSettings, cache: Path, concurrency: int) -> dict[str, dict]:
    """Verdicts of the judge model by row id, from `cache` (JSONL) and, for rows not there, asked now
    (each appended as it arrives, so an interrupted run resumes)."""
    found: dict[str, dict] = {}
    if cache.is_file():
        for line in cache.read_text(encoding="utf-8").splitlines():
            if line.strip():
                record = json.loads(line)
                found[record["id"]] = record
    # A verdict is for the request and response it was asked about: an edited row is asked again.
    pending = [row for row in rows if found.get(row["id"], {}).get("pair_sha256") != pair_digest(row)]
    if pending:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with ChatClient(settings.base_url, api_key=settings.api_key.get_secret_value(), timeout_s=settings.timeout_s,
                        max_connections=concurrency) as client, open(cache, "a", encoding="utf-8") as out, \
                ThreadPoolExecutor(concurrency) as pool:
            judge = ModelJudgeClient(settings, client)
            started = time.perf_counter()
            verdicts = pool.map(lambda row: judge.verdict(row.get("prompt", ""), row["response"]), pending)
            for row, verdict in zip(pending, verdicts):
                record = {"id": row["id"], "refusal": verdict.refusal, "p_refusal": verdict.p_refusal,
                          "raw": verdict.raw, "pair_sha256": pair_digest(row)}
                out.write(json.dumps(record) + "\n")
                out.flush()
                found[row["id"]] = record
            elapsed = time.perf_counter() - started
            print(f"- {settings.name}: asked {len(pending)} verdicts in {elapsed:.0f} s "
                  f"({elapsed / len(pending):.2f} s an answer at {concurrency} in flight)")
    return found


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


def dev_threshold(rows: list[dict], verdicts: dict[str, dict]) -> float | None:
    """The P(refusal) threshold with the best agreement on the dev rows (ties: the one nearest 0.5), None
    when some dev verdict has no probability. For judge models whose answers are skewed: a small
    model may never put P(yes) above one half, yet rank refusals above compliance."""
    dev = [(verdicts[row["id"]]["p_refusal"], row["refusal"]) for row in rows if row["split"] == "dev"]
    if not dev or any(p is None for p, _ in dev):
        return None
    values = sorted({p for p, _ in dev})
    candidates = [(a + b) / 2 for a, b in zip(values, values[1:])] or values

    def agreement(threshold: float) -> int:
        return sum((p >= threshold) == label for p, label in dev)

    return max(candidates, key=lambda t: (agreement(t), -abs(t - 0.5)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", type=Path, default=DEFAULT_LABELS)
    parser.add_argument("--judge", action="append", choices=sorted(JUDGES), help="judge(s) to score (default: all)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    parser.add_argument("--errors", action="store_true", help="also list every disagreement with the labels")
    parser.add_argument("--audit", type=Path, help="JSONL of a second reading ({id, refusal}): its agreement")
    parser.add_argument("--model-judge-url", help="also score a refusal judge model served here")
    parser.add_argument("--model-judge-model", help="its served model name")
    parser.add_argument("--model-judge-format", choices=["ask", "wildguard"], default="ask")
    parser.add_argument("--model-judge-threshold", type=float, default=0.5)
    parser.add_argument("--model-judge-cache", type=Path, help="verdict cache (default: runs/judge-model/...)")
    parser.add_argument("--concurrency", type=int, default=8, help="judge model requests in flight")
    args = parser.parse_args()
    if (args.model_judge_url is None) != (args.model_judge_model is None):
        parser.error("--model-judge-url and --model-judge-model go together")

    rows = read_labels(args.labels)
    names = args.judge or sorted(JUDGES)
    judges = {name: string_judge(name) for name in names}
    unknown = 0
    if args.model_judge_url:
        settings = ModelJudgeSettings(base_url=args.model_judge_url, model=args.model_judge_model,
                                      format=args.model_judge_format, threshold=args.model_judge_threshold)
        cache = args.model_judge_cache or Path("runs") / "judge-model" / verdict_file(settings)
        verdicts = model_verdicts(rows, settings, cache, args.concurrency)
        unknown = sum(verdicts[row["id"]]["refusal"] is None for row in rows)
        judges[settings.name] = lambda row: verdicts[row["id"]]["refusal"] is True
        threshold = dev_threshold(rows, verdicts)
        if threshold is not None:  # calibrated on dev rows only: its test figures are held out
            judges[f"{settings.name}@dev-threshold={threshold:.3f}"] = (  # no probability: no refusal
                lambda row: (verdicts[row["id"]]["p_refusal"] or 0.0) >= threshold)
    results = evaluate(rows, judges)
    speeds = time_judges(rows, names)
    if args.json:
        print(json.dumps({"labels": str(args.labels), "rows": len(rows), "model_judge_unknown": unknown,
                          "scores": [s.as_dict() for s in results], "chars_per_second": speeds}, indent=2))
    else:
        print(format_table(results))
        print()
        mean_characters = sum(len(row["response"]) for row in rows) / len(rows)
        for name, speed in speeds.items():
            print(f"- {name}: {speed / 1e6:.2f} M characters/s on whole answers, "
                  f"{1e6 * mean_characters / speed:.0f} µs per answer of {mean_characters:.0f} characters "
                  "on average (this machine, best of 5)")
        if args.model_judge_url:
            print(f"- the judge model's verdict was unreadable on {unknown} of {len(rows)} answers "
                  "(counted as no refusal)")
    if args.audit is not None:
        audit = [json.loads(line) for line in args.audit.read_text(encoding="utf-8").splitlines() if line.strip()]
        for group, (agree, n) in sorted(audit_agreement(rows, audit).items()):
            print(f"- second reading vs labels, {group}: {agree}/{n} = "
                  f"{with_interval(agree / n, agree, n)} % agreement [95% CI]")
    if args.errors:
        for name, predict in judges.items():
            for row in rows:
                predicted = predict(row)
                if predicted != row["refusal"]:
                    kind = "FP" if predicted else "FN"
                    why = get_judge(name).judge(row["response"]).matched if name in JUDGES else None
                    print(f"{name} {kind} [{row['split']}] {row['id']}: {why!r} | {row['response'][:200]!r}")


if __name__ == "__main__":
    main()
