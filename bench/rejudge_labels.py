"""Judge a run's stored label samples again with another (or a newer) judge, into a new run directory.

    PYTHONPATH=. .venv/bin/python bench/rejudge_labels.py SRC_RUN DST_RUN [--judge phrases] [--first-samples N]

The label stage stores every sample it drew (`labels.json` records), so a better judge does not need
new samples: each record is scored again exactly as the label stage does (`trainer.label.score_samples`:
the paper's post-processing, the `num_keep` longest kept, soft label = share complied). DST_RUN gets
the new `labels.json` (with `rejudged_from`/`rejudged_with` recorded), the source's `label.done.json`,
`config.json` and, when present, its extracted states, so `python -m trainer all --run-dir DST_RUN`
goes on from fit. Prints the refusal rate per condition and class before and after.

`--first-samples N` keeps only each record's first N samples (and at most N of them), which is exactly
what a label run with `num_samples=N` draws, because samples are seeded per (query, sample index): the
label-samples ablation from one sampling run. The carried `config.json` still names the source's
`num_samples`; `labels.json` records `first_samples`.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from safeprompt.judge import get_judge
from trainer.label import score_samples

CARRIED = ("label.done.json", "config.json", "states.safetensors", "states.json", "extract.done.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    parser.add_argument("--judge", default="phrases")
    parser.add_argument("--first-samples", type=int, default=None, help="keep each record's first N samples")
    args = parser.parse_args()
    if args.first_samples is not None and args.first_samples < 1:
        parser.error("--first-samples must be at least 1")
    labels = json.loads((args.source / "labels.json").read_text())
    config = json.loads((args.source / "config.json").read_text())
    judge = get_judge(args.judge)
    num_keep = config["label"]["num_keep"]
    if args.first_samples is not None:
        num_keep = min(num_keep, args.first_samples)
    harmless = labels["harmless"]
    before: dict[tuple[str, bool], list[float]] = {}
    after: dict[tuple[str, bool], list[float]] = {}
    records = []
    for record in labels["records"]:
        samples = record["samples"][: args.first_samples]  # [:None]: all of them
        new = score_samples(record["condition"], record["query_index"], samples, judge, num_keep)
        key = (record["condition"], bool(harmless[record["query_index"]]))
        before.setdefault(key, []).append(1 - record["soft_label"])
        after.setdefault(key, []).append(1 - new.soft_label)
        records.append(
            {**record, "samples": new.samples, "refusals": new.refusals, "kept": new.kept, "soft_label": new.soft_label}
        )
    by_condition = {(r["condition"], r["query_index"]): r["soft_label"] for r in records}
    labels["records"] = records
    labels["soft_labels"] = [
        [by_condition[(c, q)] for q in range(len(labels["queries"]))] for c in labels["conditions"]
    ]
    labels["rejudged_from"] = str(args.source)
    labels["rejudged_with"] = args.judge
    if args.first_samples is not None:
        labels["first_samples"] = args.first_samples
    args.target.mkdir(parents=True, exist_ok=True)
    for name in CARRIED:
        if (args.source / name).exists():
            shutil.copy2(args.source / name, args.target / name)
    (args.target / "labels.json").write_text(json.dumps(labels, indent=2) + "\n")
    print("| condition | class | refusal before | refusal after |\n| --- | --- | --- | --- |")
    for key in sorted(before):
        b, a = before[key], after[key]
        print(
            f"| {key[0]} | {'harmless' if key[1] else 'harmful'} | {100 * sum(b) / len(b):.1f} | "
            f"{100 * sum(a) / len(a):.1f} |"
        )


if __name__ == "__main__":
    main()
