"""Is there a refusal direction? Cross-validated probes on a trainer run's states and labels.

    PYTHONPATH=. .venv/bin/python bench/probe_strength.py RUN [RUN ...] [--components 4,16,64,0]

For each run (a directory with `states.safetensors` and `labels.json`, as the trainer writes them):
a logistic regression on "refused by most of the kept samples" (soft label < 0.5) in the first k PCA
components of all states (k = 0: the whole hidden state), scored by 10-fold stratified cross-validation,
against the majority-class baseline; once over every (condition, query) and once over harmful queries
only. The fit stage's own in-sample figure (`fit.json` health) can flatter a weak direction; this is the
out-of-sample check behind docs/trainer.md's probe tables.

With at least two samples per record it also reports how noisy the labels themselves are: the soft
label from the first half of each record's samples against the one from the second half (Pearson r,
and how often the two halves agree on "refused by most").
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


def cross_validated(x: np.ndarray, y: np.ndarray, components: int, seed: int = 0) -> float:
    steps = ([PCA(components, random_state=seed)] if components else []) + [
        StandardScaler(),
        LogisticRegression(C=1.0, max_iter=5000),
    ]
    folds = StratifiedKFold(10, shuffle=True, random_state=seed)
    return float(cross_val_score(make_pipeline(*steps), x, y, cv=folds).mean())


def split_half(records: list[dict]) -> tuple[float, float] | None:
    first, second = [], []
    for record in records:
        refusals = record["refusals"]
        half = len(refusals) // 2
        if half == 0:
            return None
        first.append(1 - sum(refusals[:half]) / half)
        second.append(1 - sum(refusals[half : 2 * half]) / half)
    a, b = np.array(first), np.array(second)
    return float(np.corrcoef(a, b)[0, 1]), float(np.mean((a < 0.5) == (b < 0.5)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--components", default="4,16,64,0", help="PCA sizes; 0 = the whole hidden state")
    args = parser.parse_args()
    sizes = [int(value) for value in args.components.split(",")]
    header = " | ".join(f"PCA {k}" if k else "all dims" for k in sizes)
    print(
        f"| run | states | samples | refused by most | baseline | {header} | harmful only: baseline | "
        f"{header} | split-half r, agreement |"
    )
    print("| --- " * (6 + 2 * len(sizes)) + "|")
    for run in args.runs:
        labels = json.loads((run / "labels.json").read_text())
        states = load_file(str(run / "states.safetensors"))["states"].astype(np.float64)  # [C, Q, H]
        soft = np.array(labels["soft_labels"])  # [C, Q], 1 = complied
        harmful = ~np.array(labels["harmless"], dtype=bool)
        x = states.reshape(-1, states.shape[-1])
        y = (soft < 0.5).reshape(-1).astype(int)
        mask = np.broadcast_to(harmful, soft.shape).reshape(-1)
        rows = []
        for xs, ys in ((x, y), (x[mask], y[mask])):
            baseline = max(ys.mean(), 1 - ys.mean())
            rows.append((baseline, [cross_validated(xs, ys, k) for k in sizes]))
        samples = {len(record["samples"]) for record in labels["records"]}
        half = split_half(labels["records"])
        cells = [
            f"{100 * rows[0][0]:.1f}",
            *(f"{100 * v:.1f}" for v in rows[0][1]),
            f"{100 * rows[1][0]:.1f}",
            *(f"{100 * v:.1f}" for v in rows[1][1]),
        ]
        print(
            f"| {run.name} | {len(y)} | {'/'.join(map(str, sorted(samples)))} | {100 * y.mean():.1f}% | "
            + " | ".join(cells)
            + " | "
            + (f"{half[0]:.2f}, {100 * half[1]:.0f}%" if half else "-")
            + " |"
        )


if __name__ == "__main__":
    main()
