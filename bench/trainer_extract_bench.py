"""Benchmark: batched extraction (right-padded batches, read at lengths - 1) against the authors'
straightforward loop (one unpadded forward per (condition, query)); same outputs, wall time.

Usage: PYTHONPATH=. .venv/bin/python bench/trainer_extract_bench.py --model smollm2 --queries 16 --threads 1
Prints one JSON line: seconds for each, speed-up, max |difference| of the states.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from trainer.data import read_queries
from trainer.extract import extract_states, extract_states_per_query
from trainer.model import load_frozen_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny", help="'tiny', 'smollm2' or a model folder")
    parser.add_argument("--queries", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.model == "tiny":
        from safeprompt.models import build_tiny_llama

        model_dir = build_tiny_llama(Path(tempfile.mkdtemp()) / "tiny", seed=0)
    elif args.model == "smollm2":
        from safeprompt.models import prepare_smollm2

        model_dir = prepare_smollm2()
    else:
        model_dir = Path(args.model)
    frozen = load_frozen_model(model_dir)
    queries = read_queries(Path("data/jbb_behaviors/harmful-behaviors.csv"))[: args.queries]
    conditions = ["none", "default"]
    extract_states(frozen, conditions, queries[:2], args.batch_size, show_progress=False)  # warm-up
    started = time.perf_counter()
    batched = extract_states(frozen, conditions, queries, args.batch_size, show_progress=False)
    batched_s = time.perf_counter() - started
    started = time.perf_counter()
    loop = extract_states_per_query(frozen, conditions, queries)
    loop_s = time.perf_counter() - started
    print(json.dumps({"model": str(model_dir.name), "states": len(conditions) * len(queries),
                      "batch_size": args.batch_size, "threads": args.threads,
                      "batched_s": round(batched_s, 2), "per_query_loop_s": round(loop_s, 2),
                      "speedup": round(loop_s / batched_s, 2),
                      "max_abs_diff": float((batched - loop).abs().max())}))


if __name__ == "__main__":
    main()
