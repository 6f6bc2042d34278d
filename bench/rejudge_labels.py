"""Judge a run's stored label samples again with another (or a newer) judge, into a new run directory.

    PYTHONPATH=. .venv/bin/python bench/rejudge_labels.py SRC_RUN DST_RUN [--judge phrases] [--first-samples N]
    PYTHONPATH=. .venv/bin/python bench/rejudge_labels.py SRC_RUN DST_RUN --model-judge-url URL --model-judge-model NAME

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

`--model-judge-url/--model-judge-model` judge the samples with a refusal judge model instead (what
`label.model_judge` does while sampling; docs/judges.md): each sample with its query, `--concurrency`
calls at once; unreadable verdicts count as complied and are counted per record (`unknown`).
"""

from __future__ import annotations

import argparse
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from safeprompt.client import ChatClient
from safeprompt.judge import get_judge
from safeprompt.judge.model_judge import ModelJudgeSettings
from safeprompt.model_judge_client import ModelJudgeClient
from trainer.label import score_samples

CARRIED = ("label.done.json", "config.json", "states.safetensors", "states.json", "extract.done.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    parser.add_argument("--judge", default="phrases")
    parser.add_argument("--first-samples", type=int, default=None, help="keep each record's first N samples")
    parser.add_argument("--model-judge-url", help="judge with a refusal judge model served here instead")
    parser.add_argument("--model-judge-model", help="its served model name")
    parser.add_argument("--model-judge-format", choices=["ask", "wildguard"], default="ask")
    parser.add_argument("--model-judge-threshold", type=float, default=0.5)
    parser.add_argument("--concurrency", type=int, default=8, help="judge model requests in flight")
    args = parser.parse_args()
    if (args.model_judge_url is None) != (args.model_judge_model is None):
        parser.error("--model-judge-url and --model-judge-model go together")
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
    verdicts: dict[tuple[int, int], bool | None] = {}  # (record, sample) -> a judge model's verdict
    judged_with = args.judge
    if args.model_judge_url:
        settings = ModelJudgeSettings(base_url=args.model_judge_url, model=args.model_judge_model,
                                      format=args.model_judge_format, threshold=args.model_judge_threshold)
        judged_with = settings.name
        pairs = [(r, k, labels["queries"][record["query_index"]], sample)
                 for r, record in enumerate(labels["records"])
                 for k, sample in enumerate(record["samples"][: args.first_samples])]
        with ChatClient(settings.base_url, max_connections=args.concurrency, timeout_s=settings.timeout_s) as client, \
                ThreadPoolExecutor(args.concurrency) as pool:
            model = ModelJudgeClient(settings, client)
            answers = pool.map(lambda pair: model.verdict(pair[2], pair[3]).refusal, pairs)
            verdicts = {(r, k): verdict for (r, k, _, _), verdict in zip(pairs, answers)}
    records = []
    for r, record in enumerate(labels["records"]):
        samples = record["samples"][: args.first_samples]  # [:None]: all of them
        new = score_samples(record["condition"], record["query_index"], samples, judge, num_keep,
                            verdicts=[verdicts[(r, k)] for k in range(len(samples))] if verdicts else None)
        key = (record["condition"], bool(harmless[record["query_index"]]))
        before.setdefault(key, []).append(1 - record["soft_label"])
        after.setdefault(key, []).append(1 - new.soft_label)
        records.append(
            {**record, "samples": new.samples, "refusals": new.refusals, "kept": new.kept, "soft_label": new.soft_label,
             "unknown": new.unknown}
        )
    by_condition = {(r["condition"], r["query_index"]): r["soft_label"] for r in records}
    labels["records"] = records
    labels["soft_labels"] = [
        [by_condition[(c, q)] for q in range(len(labels["queries"]))] for c in labels["conditions"]
    ]
    labels["rejudged_from"] = str(args.source)
    labels["rejudged_with"] = judged_with
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
