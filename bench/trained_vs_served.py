"""Trained is served, measured: greedy agreement between the trainer's own forward pass and the answers
a vLLM server gives for the same soft prompt, on real queries.

For each query the trainer splices θ exactly as vLLM does (`trainer.chat`) and decodes greedily with
the HF model in `--trainer-dtype`; the vLLM server (already running, serving the same model folder)
answers the same chat with θ as a `prompt_embeds` system message at temperature 0. Reported: the
share of queries whose token sequences are identical, the mean length of the common prefix, and the
prompt token counts on both sides. Run it once with the trainer in float32 and once in the dtype
vLLM serves in (bf16 by default on CPU) to see the drift and its fix.

  PYTHONPATH=. .venv/bin/python bench/trained_vs_served.py --model-dir DIR --artifact artifacts/X/dro \
      --vllm-url http://127.0.0.1:8001 --served-name NAME --trainer-dtype bfloat16 --limit 100 --out report.json
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

from evaluation.querysets import load_builtin_set
from safeprompt.artifact import load_artifact
from safeprompt.artifact_write import read_tensors
from safeprompt.embeds import encode_payload, prompt_embeds_part, wire_dtype
from trainer.answers import greedy_answers
from trainer.chat import build_spliced_batch
from trainer.model import load_frozen_model


def served_tokens(client: httpx.Client, served_name: str, encoded: str, query: str, max_tokens: int,
                  tokenizer) -> tuple[list[int], int]:
    body = {"model": served_name, "temperature": 0, "max_tokens": max_tokens,
            "messages": [{"role": "system", "content": [prompt_embeds_part(encoded)]},
                         {"role": "user", "content": query}]}
    response = client.post("/v1/chat/completions", json=body)
    response.raise_for_status()
    payload = response.json()
    choice = payload["choices"][0]
    # The text is the primary figure; its re-encoding gives the common-prefix length in tokens.
    return tokenizer.encode(choice["message"]["content"], add_special_tokens=False), payload["usage"]["prompt_tokens"]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--artifact", type=Path, required=True)
    parser.add_argument("--vllm-url", required=True)
    parser.add_argument("--served-name", required=True)
    parser.add_argument("--trainer-dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--sets", default="advbench,sounds_harmful")
    parser.add_argument("--limit", type=int, default=50, help="queries per set")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)

    frozen = load_frozen_model(args.model_dir, args.trainer_dtype)
    artifact = load_artifact(args.artifact)
    soft = read_tensors(artifact)["soft_prompt"]
    encoded = encode_payload(artifact.payload(wire_dtype(artifact.manifest.dtype, None)))  # as the gateway sends it
    queries = [q for name in args.sets.split(",") for q in load_builtin_set(name).head(args.limit).queries]
    with httpx.Client(base_url=args.vllm_url, timeout=300) as client, ThreadPoolExecutor(8) as pool:
        served = list(pool.map(lambda q: served_tokens(client, args.served_name, encoded, q, args.max_tokens,
                                                       frozen.tokenizer), queries))
    rows = []
    for query, (served_ids, served_prompt_tokens) in zip(queries, served):
        batch = build_spliced_batch(frozen.tokenizer, frozen.sentinel_id, [query], soft.shape[0], frozen.pad_id)
        trained_text = greedy_answers(frozen, soft, [query], args.max_tokens)[0].text
        trained_ids = frozen.tokenizer.encode(trained_text, add_special_tokens=False)
        served_text = frozen.tokenizer.decode(served_ids)
        rows.append({"query": query, "identical": trained_text.strip() == served_text.strip(),
                     "common_prefix_tokens": common_prefix(trained_ids, served_ids),
                     "trained_tokens": len(trained_ids), "served_tokens": len(served_ids),
                     "prompt_tokens_trainer": int(batch.lengths[0]), "prompt_tokens_vllm": served_prompt_tokens,
                     "trained": trained_text, "served": served_text})
        print(f"{len(rows)}/{len(queries)} identical={rows[-1]['identical']}", file=sys.stderr, flush=True)
    summary = {"trainer_dtype": args.trainer_dtype, "artifact_dtype": artifact.manifest.dtype,
               "queries": len(rows), "identical_share": sum(r["identical"] for r in rows) / len(rows),
               "mean_common_prefix_tokens": sum(r["common_prefix_tokens"] for r in rows) / len(rows),
               "prompt_token_counts_equal": all(r["prompt_tokens_trainer"] == r["prompt_tokens_vllm"] for r in rows),
               "max_tokens": args.max_tokens}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
