"""Fit the `learned` refusal judge on hand-labelled answers and write its model file.

    PYTHONPATH=. .venv/bin/python -m evaluation.judge_training                # fit on dev rows, write the model
    PYTHONPATH=. .venv/bin/python -m evaluation.judge_training --check-only   # cross-validation only

Reads `data/judge_labels/labels.jsonl`, keeps the rows of `--split` (default `dev`: the frozen `test`
rows are never fitted on), turns each answer's head into `safeprompt.judge.learned.features` (the very
function the gateway runs), and fits scikit-learn's L2 logistic regression on binary features. The
regularisation C is chosen by cross-validation that leaves one answering model out at a time (the
question a user asks: is it right on a model nobody labelled?), and the cross-validated agreement per
left-out model is printed and stored in the model file with the digest of the rows fitted on, the row counts
and the command. Only features seen in at least `--min-count` training answers are kept, so the file
stays small and every weight rests on more than one answer. The file is written atomically.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression

from safeprompt.files import atomic_write_text
from safeprompt.judge.learned import MODEL_FILE, MODEL_FORMAT, LinearModel, features
from safeprompt.judge.phrases import HEAD_CHARS, answer_head

DEFAULT_LABELS = Path(__file__).resolve().parent.parent / "data" / "judge_labels" / "labels.jsonl"
C_GRID = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0)


def read_rows(path: Path, split: str) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [row for row in rows if isinstance(row.get("refusal"), bool)]
    return [row for row in rows if split == "all" or row["split"] == split]


def rows_sha256(rows: list[dict]) -> str:
    """Digest of what the model is fitted on (id, answer, label of each row), blind to other rows."""
    canonical = [[row["id"], row["response"], row["refusal"]] for row in sorted(rows, key=lambda row: row["id"])]
    return hashlib.sha256(json.dumps(canonical, ensure_ascii=False).encode("utf-8")).hexdigest()


def vocabulary(feature_sets: list[set[str]], min_count: int) -> list[str]:
    counts = Counter(name for found in feature_sets for name in found)
    return sorted(name for name, count in counts.items() if count >= min_count)


def matrix(feature_sets: list[set[str]], names: list[str]) -> np.ndarray:
    index = {name: column for column, name in enumerate(names)}
    out = np.zeros((len(feature_sets), len(names)), dtype=np.float64)
    for row, found in enumerate(feature_sets):
        for name in found:
            if name in index:
                out[row, index[name]] = 1.0
    return out


def fit(feature_sets: list[set[str]], labels: list[bool], c: float, min_count: int,
        class_weight: str | None) -> LinearModel:
    names = vocabulary(feature_sets, min_count)
    model = LogisticRegression(C=c, max_iter=5000, class_weight=class_weight)
    model.fit(matrix(feature_sets, names), np.array(labels, dtype=int))
    weights = {name: round(float(weight), 5) for name, weight in zip(names, model.coef_[0], strict=True)
               if abs(weight) >= 1e-4}
    return LinearModel(round(float(model.intercept_[0]), 5), weights, 0.0, "")


def predict(model: LinearModel, feature_sets: list[set[str]]) -> list[bool]:
    return [model.bias + sum(model.weights.get(name, 0.0) for name in found) > model.threshold
            for found in feature_sets]


def leave_one_group_out(rows: list[dict], feature_sets: list[set[str]], c: float, min_count: int,
                        class_weight: str | None) -> dict[str, dict[str, float | int]]:
    """Per answering model: fit on the other models' rows, score this one's."""
    out: dict[str, dict[str, float | int]] = {}
    for group in sorted({row["group"] for row in rows}):
        train = [i for i, row in enumerate(rows) if row["group"] != group]
        held = [i for i, row in enumerate(rows) if row["group"] == group]
        model = fit([feature_sets[i] for i in train], [rows[i]["refusal"] for i in train], c, min_count,
                    class_weight)
        predicted = predict(model, [feature_sets[i] for i in held])
        truth = [rows[i]["refusal"] for i in held]
        tp = sum(p and t for p, t in zip(predicted, truth, strict=True))
        fp = sum(p and not t for p, t in zip(predicted, truth, strict=True))
        fn = sum(t and not p for p, t in zip(predicted, truth, strict=True))
        out[group] = {"n": len(held), "refusals": sum(truth), "tp": tp, "fp": fp, "fn": fn,
                      "agreement": round(sum(p == t for p, t in zip(predicted, truth, strict=True)) / len(held), 4)}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", type=Path, default=DEFAULT_LABELS)
    parser.add_argument("--split", default="dev", choices=("dev", "test", "all"))
    parser.add_argument("--min-count", type=int, default=2)
    parser.add_argument("--class-weight", default="balanced", choices=("balanced", "none"))
    parser.add_argument("--c", type=float, help="regularisation C (default: chosen from the grid by cross-validation)")
    parser.add_argument("--out", type=Path, default=MODEL_FILE)
    parser.add_argument("--check-only", action="store_true", help="cross-validate, write nothing")
    args = parser.parse_args(argv)
    class_weight = None if args.class_weight == "none" else args.class_weight

    rows = read_rows(args.labels, args.split)
    if len({row["group"] for row in rows}) < 2 or len({row["refusal"] for row in rows}) < 2:
        sys.exit(f"{args.labels}: need labelled rows of both classes from at least two models in '{args.split}'")
    feature_sets = [features(answer_head(row["response"])[0]) for row in rows]

    by_c = {}
    grid = (args.c,) if args.c else C_GRID
    for c in grid:
        scores = leave_one_group_out(rows, feature_sets, c, args.min_count, class_weight)
        worst = min(float(score["agreement"]) for score in scores.values())
        mean = sum(float(score["agreement"]) for score in scores.values()) / len(scores)
        by_c[c] = (worst, mean, scores)
        print(f"C={c:<5} leave-one-model-out agreement: worst {worst:.3f}, mean {mean:.3f}  "
              + ", ".join(f"{group} {score['agreement']:.3f}" for group, score in scores.items()))
    best_c = max(grid, key=lambda c: (by_c[c][0], by_c[c][1]))
    print(f"chosen C={best_c} (best worst-model agreement, then mean)")
    if args.check_only:
        return

    model = fit(feature_sets, [row["refusal"] for row in rows], best_c, args.min_count, class_weight)
    document = {
        "format": MODEL_FORMAT,
        "judge": "learned",
        "head_chars": HEAD_CHARS,
        "bias": model.bias,
        "threshold": model.threshold,
        "training": {
            "labels": "data/judge_labels/labels.jsonl",
            "rows_sha256": rows_sha256(rows),
            "split": args.split,
            "rows": len(rows),
            "refusals": sum(row["refusal"] for row in rows),
            "rows_per_model": dict(Counter(row["group"] for row in rows)),
            "c": best_c,
            "class_weight": args.class_weight,
            "min_count": args.min_count,
            "leave_one_model_out": by_c[best_c][2],
            "command": "python -m evaluation.judge_training " + " ".join(argv if argv is not None else sys.argv[1:]),
        },
        "weights": dict(sorted(model.weights.items())),
    }
    atomic_write_text(args.out, json.dumps(document, indent=1, ensure_ascii=False) + "\n")
    print(f"{len(model.weights)} weights, bias {model.bias} -> {args.out}")


if __name__ == "__main__":
    main()
