"""The gateway's GPU check (issue 12), run by `bench/gpu_check.sh run` on a lent GPU machine.

vLLM's GPU build serves a randomly initialised model of Llama-2-7B's shape (`--load-format dummy`:
no weights to download or carry; SmolLM2's tokenizer and chat template from build/gpu), in bf16;
`bench/gateway_vs_vllm.py` then compares the gateway against direct requests at concurrency 1, 32
and 128, including a soft prompt of the 7B hidden size (4096) sent as bf16 `prompt_embeds`.

It needs, in the Python that runs it, vLLM with CUDA and the gateway's own packages. When either
is missing it writes `{"status": "skipped", "reason": ...}` and exits 0, so the trainer check's
figures still come back. The lent machine's image lacks pydantic (docs/gpu.md), which vLLM requires,
so it has no vLLM; it reaches no package registry, and vLLM's wheels (hundreds of MB with their CUDA
libraries) exceed what a run may carry (64 MiB).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The gateway's runtime (aiohttp its client to vLLM), plus what the benchmark itself uses (httpx: stack's
# readiness probes; safetensors and torch: the soft-prompt artifact).
GATEWAY_MODULES = ("fastapi", "uvicorn", "aiohttp", "prometheus_client", "orjson", "pybase64", "pydantic_settings",
                   "yaml", "httpx", "safetensors", "torch")
# Llama-2-7B's shape with SmolLM2's vocabulary (the tokenizer that can be carried).
LLAMA2_7B_SHAPE = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "vocab_size": 49152, "hidden_act": "silu",
    "tie_word_embeddings": False, "dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
}


def missing_modules() -> list[str]:
    return [name for name in ("vllm", *GATEWAY_MODULES) if importlib.util.find_spec(name) is None]


def model_folder(tokenizer_dir: Path, target: Path) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    for item in tokenizer_dir.iterdir():
        if item.is_file() and item.name != "config.json":
            (target / item.name).write_bytes(item.read_bytes())
    (target / "config.json").write_text(json.dumps(LLAMA2_7B_SHAPE, indent=1))
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokenizer-dir", type=Path, default=REPO / "build" / "gpu" / "smollm2-tokenizer")
    parser.add_argument("--concurrency", default="1,32,128")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    missing = missing_modules()
    if missing or not (args.tokenizer_dir / "tokenizer.json").is_file():
        reason = (f"this Python ({sys.executable}) cannot import {', '.join(missing)}" if missing else
                  f"no tokenizer in {args.tokenizer_dir} (run `bash bench/gpu_check.sh prepare`, carry build/gpu)")
        args.out.write_text(json.dumps({"status": "skipped", "reason": reason}, indent=1) + "\n")
        print(f"gateway GPU check skipped: {reason}")
        return 0
    folder = model_folder(args.tokenizer_dir, args.out.parent / "llama2-7b-shape")
    command = [sys.executable, str(REPO / "bench" / "gateway_vs_vllm.py"), "--model", str(folder),
               "--vllm-python", sys.executable, "--vllm-arg=--load-format=dummy", "--dtype", "bfloat16",
               "--concurrency", args.concurrency, "--tokens", "32", "--requests-per-slot", "4", "--blocks", "4",
               "--soft-tokens", "100", "--max-model-len", "4096", "--out", str(args.out)]
    print(" ".join(command), flush=True)
    return subprocess.call(command, cwd=REPO)


if __name__ == "__main__":
    sys.exit(main())
