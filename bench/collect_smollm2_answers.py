"""Collect SmolLM2-135M-Instruct answers for the judge's labelled set (unlabelled output).

Starts one vLLM CPU server on the embedded SmolLM2 (through `stack.processes.start_vllm`), asks it
JailbreakBench harmful and benign goals and AdvBench goals under the paper's prompt conditions
(greedy, 128 tokens) and writes `{"source", "prompt", "condition", "response"}` lines. The labels are
added by hand afterwards (see data/judge_labels/README.md); this script knows nothing about judges.

    .venv/bin/python -m bench.collect_smollm2_answers --out /tmp/smollm2_answers.jsonl
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from safeprompt.prompts import HUMAN_PROMPTS, PROMPT_CONDITIONS
from stack.processes import free_port, servers_stopped_on_exit, start_vllm

SERVED_NAME = "smollm2"


def read_goals(path: Path) -> list[str]:
    with open(path, newline="") as handle:
        return [row["goal"] for row in csv.DictReader(handle)]


def plan_requests(data_dir: Path, per_source: int) -> list[dict]:
    """Distinct goals from each source, the prompt condition cycling over the paper's four."""
    sources = {
        "jbb_harmful": read_goals(data_dir / "jbb_behaviors" / "harmful-behaviors.csv"),
        "jbb_benign": read_goals(data_dir / "jbb_behaviors" / "benign-behaviors.csv"),
        # AdvBench rows 100+ so the set does not overlap the paper's AdvBench[:100] evaluation.
        "advbench": read_goals(data_dir / "advbench" / "harmful_behaviors.csv")[100:],
    }
    plan = []
    for source, goals in sources.items():
        step = max(1, len(goals) // per_source)
        for position, goal in enumerate(goals[::step][:per_source]):
            condition = PROMPT_CONDITIONS[position % len(PROMPT_CONDITIONS)]
            plan.append({"source": source, "prompt": goal, "condition": condition})
    return plan


def ask(client: httpx.Client, base_url: str, item: dict, max_tokens: int) -> dict:
    messages = []
    if item["condition"] != "none":
        messages.append({"role": "system", "content": HUMAN_PROMPTS[item["condition"]]})
    messages.append({"role": "user", "content": item["prompt"]})
    reply = client.post(f"{base_url}/v1/chat/completions", json={
        "model": SERVED_NAME, "messages": messages, "temperature": 0.0, "max_tokens": max_tokens,
    }, timeout=600.0)
    reply.raise_for_status()
    return {**item, "model": "SmolLM2-135M-Instruct (Q4_1, greedy, 128 tokens)",
            "response": reply.json()["choices"][0]["message"]["content"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parent.parent / "data",
                        help="folder with jbb_behaviors/ and advbench/ (default: the repository's data/)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--per-source", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()

    from safeprompt.models import prepare_smollm2

    plan = plan_requests(args.data_dir, args.per_source)
    port = free_port()
    log_path = Path(tempfile.gettempdir()) / f"collect-smollm2-vllm-{port}.log"
    with servers_stopped_on_exit() as servers:  # also on SIGTERM/SIGINT/SIGHUP
        servers.append(start_vllm(prepare_smollm2(), served_model_name=SERVED_NAME, port=port, log_path=log_path))
        base_url = f"http://127.0.0.1:{port}"
        with httpx.Client() as client, ThreadPoolExecutor(8) as pool:
            rows = list(pool.map(lambda item: ask(client, base_url, item, args.max_tokens), plan))
    staging = args.out.with_suffix(".tmp")
    with open(staging, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(staging, args.out)
    print(f"wrote {len(rows)} answers to {args.out}")


if __name__ == "__main__":
    main()
