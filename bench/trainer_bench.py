"""Benchmark: the trainer's label, extract and optimise stages against the authors' way, same model, same queries.

Each part times the trainer's own code path and a reference loop written the way the paper's authors
(github.com/chujiezheng/LLM-Safeguard, `code/`) run that stage one query at a time, checks that both give the
same outputs, and reports one JSON object:

- extract: `trainer.extract.extract_states` (batches of `--batch-size`: prefix shared, rows packed) against
  `extract_states_per_query` (one unpadded forward per (condition, query), as the authors' forward.py):
  seconds, speed-up, max |difference| of the states, the token passes of each side, peak memory.
- optimize: one warm-up and `--steps` timed AdamW steps (clip 1.0, as `optimize_soft_prompt`) on one batch of
  all `--queries` queries from the same θ0 (the init prompt's in-context token rows), through the trainer's
  `accumulate_gradient` (its splice, micro-batches of `--micro-batch-size`) and through a batch-of-one loop
  (θ concatenated between the chat's embedding rows, one forward + backward per query, gradients accumulated).
  Both use the trainer's loss (`dro_loss_terms`, `combine_loss`) in the same geometry: PCA of the extract
  part's states (a random orthonormal basis when extract did not run) and random probe weights of norm 0.1.
  Compared: the first step's gradient (same θ), every step's loss, θ after the last step.
- label: `trainer.label.sample_vllm` on a running vLLM server (`--vllm-url`, `--served-model-name`; the part is
  skipped without them) against `trainer.label.sample_hf`, which is the authors' generate.py: HF `generate`
  one query at a time, the query's samples in one call (`num_return_sequences`); it is not batched across
  queries. Samples cannot match token for token, so "same outputs" means: the same number of samples per
  query, no sample over its token bound, refusal rates (by the judge) within 3 standard errors of each
  other. Greedy answers (temperature 0) of both sides are compared as text and the identical ones counted:
  reported, not asserted (the server may run bf16 where HF runs float32).

Memory: CUDA `max_memory_allocated`, reset before each measured call; on CPU the process's peak RSS
(VmHWM, reset through /proc/self/clear_refs before each call) and its growth over the RSS at the reset.
Extract also reports the largest batch's padded size and the hidden-states tuple HF returns for it.

    PYTHONPATH=. .venv/bin/python bench/trainer_bench.py --model tiny --queries 4 --threads 1 --parts extract,optimize
    PYTHONPATH=. .venv/bin/python bench/trainer_bench.py --model smollm2 --queries 16 --parts label \
        --vllm-url http://127.0.0.1:8000 --served-model-name smollm2 --samples 4 --max-new-tokens 64

One JSON line per part on stdout; `--out` gets all of them (rewritten atomically after every part),
`--markdown` a table. Exit status 1 when a part failed (its error is in its JSON). Knows nothing about the
gateway; never changes the trainer code paths it measures, and never starts a vLLM server.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import math
import os
import platform
import re
import sys
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import httpx
import torch

from safeprompt.client import ChatClient
from safeprompt.files import atomic_write_text
from safeprompt.judge import get_judge
from safeprompt.models import DEFAULT_CACHE, build_tiny_llama, resolve_model
from trainer.chat import SENTINEL, chat_batch, render_ids, sentinel_position
from trainer.config import DataConfig, ExtractConfig, LabelConfig, OptimizeConfig
from trainer.data import read_queries
from trainer.extract import extract_condition_states, extract_states, extract_states_per_query, system_text
from trainer.fit import fit_pca
from trainer.geometry import DroGeometry, Pca, Probe
from trainer.label import LabelRecord, chat_messages, sample_hf, sample_vllm
from trainer.model import FrozenChatModel, load_frozen_model, shared_prefix_length
from trainer.optimize import accumulate_gradient, combine_loss, dro_loss_terms, initial_soft_prompt

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("extract", "optimize", "label")  # run order: optimize reads extract's states
MIB = 1024**2


# --- model, queries, memory -----------------------------------------------------------------------


def load_model(spec: str, dtype: str, device: str) -> tuple[FrozenChatModel, Path]:
    """`tiny` (random, cached), a name of `safeprompt.models.MODELS`, or a model folder -> (frozen model, folder)."""
    if spec == "tiny":
        model_dir = build_tiny_llama(DEFAULT_CACHE / "models" / "tiny-llama-seed0", seed=0)
    else:
        model_dir = resolve_model(spec)
    return load_frozen_model(model_dir, dtype=dtype, device=device), model_dir


def read_bench_queries(count: int) -> tuple[list[str], torch.Tensor]:
    """The first `count - count // 2` harmful and `count // 2` benign JBB-Behaviors goals -> (queries,
    harmless [count] float32, 1 = harmless)."""
    data = DataConfig()
    harmful = read_queries(ROOT / data.harmful_file, data.column)[: count - count // 2]
    benign = read_queries(ROOT / data.harmless_file, data.column)[: count // 2]
    if len(harmful) + len(benign) != count:
        raise ValueError(f"asked for {count} queries; the JBB files hold {len(harmful)} + {len(benign)}")
    return harmful + benign, torch.tensor([0.0] * len(harmful) + [1.0] * len(benign))


def read_status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field}")
    return int(match.group(1))


class PeakMemory:
    """Peak memory of one measured call (see the module docstring for what is measured where)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.start_bytes = 0
        self.resettable = True

    def describe(self) -> str:
        if self.cuda:
            return "torch.cuda.max_memory_allocated, reset before each measured call; growth over memory_allocated"
        if self.resettable:
            return "process peak RSS (VmHWM), reset via /proc/self/clear_refs before each call; growth over VmRSS"
        return "process peak RSS (VmHWM); /proc/self/clear_refs refused a reset, so peaks are cumulative"

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start_bytes = torch.cuda.memory_allocated()
            return
        gc.collect()
        # Hand memory freed by earlier calls back to the kernel first, or it would sit in the baseline RSS.
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
        try:
            Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS (Linux >= 4.0)
        except OSError:
            self.resettable = False
        self.start_bytes = read_status_kib("VmRSS") * 1024

    def read(self) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = read_status_kib("VmHWM") * 1024
        return {"peak_mib": round(peak / MIB, 1), "growth_mib": round((peak - self.start_bytes) / MIB, 1)}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(meter: PeakMemory, device: torch.device, work: Callable[[], object]) -> tuple[object, float, dict]:
    """Run `work()` once -> (its result, seconds, peak memory)."""
    meter.reset()
    started = time.perf_counter()
    result = work()
    synchronize(device)
    return result, time.perf_counter() - started, meter.read()


# --- extract --------------------------------------------------------------------------------------


def token_passes(frozen: FrozenChatModel, conditions: list[str], queries: list[str], batch_size: int) -> dict:
    """Tokens the decoder layers see in `extract_states` (each batch's shared prefix once, then the rows' own
    tokens, packed without padding) against the reference loop (every row whole): their ratio is the
    arithmetic ceiling of the speed-up."""
    trainer, reference = 0, 0
    for condition in conditions:
        for start in range(0, len(queries), batch_size):
            chunk = queries[start : start + batch_size]
            ids, mask, lengths = chat_batch(frozen.tokenizer, system_text(condition), chunk, frozen.pad_id)
            prefix = shared_prefix_length(mask, lengths, input_ids=ids)
            trainer += prefix + int((lengths - prefix).sum())
            reference += int(lengths.sum())
    return {"trainer_tokens": trainer, "reference_tokens": reference, "ratio": round(reference / trainer, 2)}


def bench_extract(
    frozen: FrozenChatModel, conditions: list[str], queries: list[str], batch_size: int, meter: PeakMemory
) -> tuple[dict, torch.Tensor]:
    """extract_states against the per-query loop -> (the part's record, the batched states [C, Q, H] float32)."""
    extract_states(frozen, conditions[:1], queries[:batch_size], batch_size, show_progress=False)  # warm-up
    batched, batched_s, batched_memory = measure(
        meter, frozen.device, lambda: extract_states(frozen, conditions, queries, batch_size, show_progress=False)
    )
    loop, loop_s, loop_memory = measure(
        meter, frozen.device, lambda: extract_states_per_query(frozen, conditions, queries)
    )
    assert batched.shape == loop.shape == (len(conditions), len(queries), frozen.hidden_size)
    difference = (batched - loop).abs()
    states = len(conditions) * len(queries)
    record = {
        "part": "extract",
        "conditions": conditions,
        "states": states,
        "batch_size": batch_size,
        "trainer": "extract_states",
        "reference": "extract_states_per_query",
        "trainer_s": batched_s,
        "reference_s": loop_s,
        "trainer_states_per_s": states / batched_s,
        "reference_states_per_s": states / loop_s,
        "speedup": loop_s / batched_s,
        "max_abs_diff": float(difference.max()),
        "max_rel_diff": float(difference.max() / loop.abs().max()),
        "token_passes": token_passes(frozen, conditions, queries, batch_size),
        "trainer_memory": batched_memory,
        "reference_memory": loop_memory,
    }
    return record, batched


# --- optimize -------------------------------------------------------------------------------------


def make_geometry(
    states: torch.Tensor | None, hidden_size: int, num_components: int, seed: int
) -> tuple[DroGeometry, str]:
    """PCA of `states` [n, H] (n > k), else a random orthonormal basis; random probe weights of norm 0.1
    (a real fit's order). The loss reads only the weights: the probes' biases cancel in Δz · w."""
    generator = torch.Generator().manual_seed(seed)
    if states is not None and states.shape[0] > num_components:
        pca, source = fit_pca(states, num_components), "fit_pca of the extract part's states"
    else:
        basis = torch.linalg.qr(torch.randn(hidden_size, num_components, generator=generator, dtype=torch.float64))[0]
        pca, source = Pca(basis.float().contiguous()), "random orthonormal basis"
    refusal, harmfulness = (
        0.1 * torch.nn.functional.normalize(torch.randn(num_components, generator=generator), dim=0) for _ in range(2)
    )
    return DroGeometry(pca, Probe(refusal, torch.zeros(())), Probe(harmfulness, torch.zeros(()))), source


def reference_soft_prompt_state(frozen: FrozenChatModel, theta: torch.Tensor, query: str) -> torch.Tensor:
    """hθ(x) [H] (model dtype) for one query, the authors' way: θ [N, H] concatenated between the embedding
    rows of the chat around the sentinel, one unpadded forward. Independent of the trainer's splice."""
    ids = render_ids(frozen.tokenizer, SENTINEL, query)
    position = sentinel_position(ids, frozen.sentinel_id)
    embedding = frozen.embedding()
    # The sentinel itself is never embedded (the model is not resized), so the two sides are embedded apart.
    before = embedding(torch.tensor(ids[:position], device=frozen.device))  # [position, H]
    after = embedding(torch.tensor(ids[position + 1 :], device=frozen.device))  # [T - position - 1, H]
    inputs = torch.cat([before, theta.to(before.dtype), after]).unsqueeze(0)  # [1, T - 1 + N, H]
    output = frozen.model(inputs_embeds=inputs, output_hidden_states=True, use_cache=False, logits_to_keep=1)
    return output.hidden_states[-1][0, -1]


def reference_gradient(
    frozen: FrozenChatModel,
    theta: torch.Tensor,
    queries: list[str],
    reference_states: torch.Tensor,
    harmless: torch.Tensor,
    geometry: DroGeometry,
    config: OptimizeConfig,
) -> dict[str, float]:
    """Batch-of-one loop: one forward + backward per query, each adding its share of the batch's mean loss
    to θ.grad. Same arguments and return value as `trainer.optimize.accumulate_gradient`."""
    sums: dict[str, float] = {}
    for i, query in enumerate(queries):
        h_theta = reference_soft_prompt_state(frozen, theta, query).unsqueeze(0)  # [1, H]
        terms = dro_loss_terms(h_theta, reference_states[i : i + 1], harmless[i : i + 1], geometry)
        per_sample = combine_loss(terms, config, harmless[i : i + 1])  # [1]
        (per_sample.sum() / len(queries)).backward()
        for name, value in {**terms.sums(), "loss": float(per_sample.detach().sum())}.items():
            sums[name] = sums.get(name, 0.0) + value
    return {name: value / len(queries) for name, value in sums.items()}


def run_steps(
    gradient: Callable[[torch.Tensor], dict[str, float]],
    theta0: torch.Tensor,
    config: OptimizeConfig,
    steps: int,
    meter: PeakMemory,
    device: torch.device,
) -> dict:
    """1 + `steps` AdamW steps on one batch, as `optimize_soft_prompt` takes them; the first is warm-up (not
    timed; its memory counts). Returns the first gradient [N, H], θ after the last step, losses, times."""
    theta = torch.nn.Parameter(theta0.detach().float().clone().to(device))
    optimizer = torch.optim.AdamW([theta], lr=config.lr, weight_decay=config.weight_decay)
    losses, seconds, first_gradient = [], [], None
    meter.reset()  # before the warm-up step: a step's memory does not depend on which one it is
    for _ in range(1 + steps):
        started = time.perf_counter()
        optimizer.zero_grad()
        record = gradient(theta)
        if first_gradient is None:
            first_gradient = theta.grad.detach().float().cpu().clone()
        torch.nn.utils.clip_grad_norm_([theta], config.clip_norm)
        optimizer.step()
        synchronize(device)
        seconds.append(time.perf_counter() - started)
        losses.append(record["loss"])
    memory = meter.read()
    return {
        "first_gradient": first_gradient,
        "theta": theta.detach().float().cpu(),
        "losses": losses,
        "warmup_s": seconds[0],
        "seconds_per_step": sum(seconds[1:]) / steps,
        "memory": memory,
    }


def bench_optimize(
    frozen: FrozenChatModel,
    queries: list[str],
    harmless: torch.Tensor,
    states: torch.Tensor | None,
    config: OptimizeConfig,
    steps: int,
    seed: int,
    meter: PeakMemory,
    extract_batch_size: int = 16,
) -> dict:
    """accumulate_gradient against the batch-of-one loop on one batch of all `queries` (harmless [Q] float)."""
    device = frozen.device
    initial = initial_soft_prompt(frozen, config.init_prompt, queries)  # θ0 [N, H] float32
    h0 = extract_condition_states(frozen, initial.system, queries, extract_batch_size).to(device)  # [Q, H] float32
    flat = None if states is None else states.reshape(-1, states.shape[-1])
    geometry, geometry_source = make_geometry(flat, frozen.hidden_size, 4, seed)
    geometry, labels = geometry.to(device), harmless.float().to(device)
    batch = dict(queries=queries, reference_states=h0, harmless=labels, geometry=geometry, config=config)
    trainer = run_steps(
        lambda theta: accumulate_gradient(frozen, theta, **batch), initial.embeddings, config, steps, meter, device
    )
    loop = run_steps(
        lambda theta: reference_gradient(frozen, theta, **batch), initial.embeddings, config, steps, meter, device
    )
    gradient_difference = (trainer["first_gradient"] - loop["first_gradient"]).abs()
    return {
        "part": "optimize",
        "init_prompt": config.init_prompt,
        "num_virtual_tokens": len(initial.token_ids),
        "batch_size": len(queries),
        "micro_batch_size": config.micro_batch_size,
        "dtype": str(frozen.embedding().weight.dtype).removeprefix("torch."),
        "geometry": geometry_source,
        "timed_steps": steps,
        "trainer": "accumulate_gradient",
        "reference": "batch-of-one loop (concatenated embeddings, one backward per query)",
        "trainer_s_per_step": trainer["seconds_per_step"],
        "reference_s_per_step": loop["seconds_per_step"],
        "trainer_warmup_s": trainer["warmup_s"],
        "reference_warmup_s": loop["warmup_s"],
        "speedup": loop["seconds_per_step"] / trainer["seconds_per_step"],
        "gradient_max_abs_diff": float(gradient_difference.max()),
        "gradient_max_rel_diff": float(gradient_difference.max() / loop["first_gradient"].abs().max()),
        "gradient_cosine": float(
            torch.nn.functional.cosine_similarity(
                trainer["first_gradient"].flatten(), loop["first_gradient"].flatten(), dim=0
            )
        ),
        "loss_max_abs_diff": max(abs(a - b) for a, b in zip(trainer["losses"], loop["losses"], strict=True)),
        "theta_max_abs_diff": float((trainer["theta"] - loop["theta"]).abs().max()),
        "trainer_losses": trainer["losses"],
        "reference_losses": loop["losses"],
        "trainer_memory": trainer["memory"],
        "reference_memory": loop["memory"],
    }


# --- label ----------------------------------------------------------------------------------------


def hf_greedy(frozen: FrozenChatModel, condition: str, query: str, max_new_tokens: int) -> str:
    ids = torch.tensor([render_ids(frozen.tokenizer, system_text(condition), query)], device=frozen.device)
    with torch.no_grad():
        output = frozen.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            max_new_tokens=max_new_tokens,
            pad_token_id=frozen.pad_id,
        )
    return frozen.tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True)


def compare_greedy(
    frozen: FrozenChatModel, client: ChatClient, config: LabelConfig, jobs: list, max_tokens: int
) -> dict:
    """Greedy answers of the server and of HF `generate` for every job, compared as text."""
    served, local, served_s, local_s = [], [], 0.0, 0.0
    for condition, _, query, _ in jobs:
        started = time.perf_counter()
        served.append(
            client.complete(
                {
                    "model": config.served_model_name,
                    "messages": chat_messages(condition, query),
                    "temperature": 0,
                    "max_tokens": max_tokens,
                }
            ).text
        )
        middle = time.perf_counter()
        local.append(hf_greedy(frozen, condition, query, max_tokens))
        served_s, local_s = served_s + middle - started, local_s + time.perf_counter() - middle
    differing = [
        {"condition": job[0], "query_index": job[1], "vllm": a[:120], "hf": b[:120]}
        for job, a, b in zip(jobs, served, local, strict=True)
        if a != b
    ]
    return {
        "max_tokens": max_tokens,
        "answers": len(jobs),
        "identical": len(jobs) - len(differing),
        "vllm_s": served_s,
        "hf_s": local_s,
        "differing_examples": differing[:3],
    }


def summarise_records(
    records: list[LabelRecord], seconds: float, frozen: FrozenChatModel, config: LabelConfig, harmless: torch.Tensor
) -> dict:
    """Throughput and the output checks of one sampler's records."""
    refusals = [r for record in records for r in record.refusals]
    over_bound, longest, counted_samples = 0, 0, 0
    for record in records:
        bound = config.sampling.max_tokens(bool(harmless[record.query_index] >= 0.5))
        for sample, counted in zip(record.samples, record.tokens, strict=True):
            # The sampler's own count where it has one (re-tokenising the text can give more tokens than
            # were generated: 65 for a 64-token SmolLM2 sample on 2026-12-03); else the re-tokenised text.
            tokens = counted if counted is not None else len(frozen.tokenizer.encode(sample, add_special_tokens=False))
            counted_samples += counted is not None
            over_bound, longest = over_bound + (tokens > bound), max(longest, tokens)
    return {
        "seconds": seconds,
        "queries_per_s": len(records) / seconds,
        "samples_per_s": len(refusals) / seconds,
        "samples_per_query": sorted({len(record.samples) for record in records}),
        "samples_over_token_bound": over_bound,
        "longest_sample_tokens": longest,
        "samples_counted_by_sampler": counted_samples,
        "samples": len(refusals),
        "refusal_rate": sum(refusals) / len(refusals),
        "mean_soft_label": sum(record.soft_label for record in records) / len(records),
    }


def bench_label(
    frozen: FrozenChatModel,
    conditions: list[str],
    queries: list[str],
    harmless: torch.Tensor,
    config: LabelConfig,
    greedy_tokens: int,
    *,
    transport: httpx.BaseTransport | None = None,
) -> dict:
    """sample_vllm against sample_hf on conditions x queries, and the greedy comparison. `transport` replaces
    the network (tests)."""
    if not config.vllm_url or not config.served_model_name:
        return {
            "part": "label",
            "skipped": "needs --vllm-url and --served-model-name of a vLLM server already "
            "serving the same model (this benchmark never starts one)",
        }
    judge = get_judge(config.judge)
    jobs = [
        (c, i, q, bool(h >= 0.5))
        for c in conditions
        for i, (q, h) in enumerate(zip(queries, harmless.tolist(), strict=True))
    ]
    with ChatClient(config.vllm_url, timeout_s=config.request_timeout_s, transport=transport) as client:
        served_models = client.list_models()
        if config.served_model_name not in served_models:
            raise ValueError(f"{config.vllm_url} serves {served_models}, not {config.served_model_name!r}")
        greedy = compare_greedy(frozen, client, config, jobs, greedy_tokens)  # also warms both sides up
    runs = {}
    for name, sample in (
        ("vllm", lambda done: sample_vllm(config, jobs, judge, done, transport=transport)),
        ("hf", lambda done: sample_hf(config, frozen, jobs, judge, done)),
    ):
        records: list[LabelRecord] = []
        started = time.perf_counter()
        sample(records.append)
        runs[name] = summarise_records(records, time.perf_counter() - started, frozen, config, harmless)
    vllm, hf = runs["vllm"], runs["hf"]
    pooled = (vllm["refusal_rate"] * vllm["samples"] + hf["refusal_rate"] * hf["samples"]) / (
        vllm["samples"] + hf["samples"]
    )
    # Samples of one query are correlated, so 3 binomial standard errors are a lenient bound, not a test.
    tolerance = 3 * math.sqrt(pooled * (1 - pooled) * (1 / vllm["samples"] + 1 / hf["samples"]))
    difference = abs(vllm["refusal_rate"] - hf["refusal_rate"])
    return {
        "part": "label",
        "conditions": conditions,
        "queries": len(queries),
        "judge": config.judge,
        "num_samples": config.num_samples,
        "max_new_tokens": [config.max_new_tokens_harmful, config.max_new_tokens_harmless],
        "concurrency": config.concurrency,
        "trainer": "sample_vllm",
        "reference": "sample_hf (HF generate per query, num_return_sequences; the authors' generate.py)",
        "trainer_s": vllm["seconds"],
        "reference_s": hf["seconds"],
        "speedup": hf["seconds"] / vllm["seconds"],
        "vllm": vllm,
        "hf": hf,
        "refusal_rate_diff": difference,
        "refusal_rate_tolerance": tolerance,
        "same_sample_counts": vllm["samples_per_query"] == hf["samples_per_query"] == [config.num_samples],
        "within_token_bounds": vllm["samples_over_token_bound"] == hf["samples_over_token_bound"] == 0,
        "refusal_rate_within_tolerance": difference <= tolerance,
        "greedy": greedy,
    }


# --- report and command line ----------------------------------------------------------------------


def markdown_table(results: dict) -> str:
    env = results["environment"]
    lines = [
        f"Trainer stages vs the authors' way: {results['model']['name']} ({env['dtype']}, {env['device']}, "
        f"{env['torch_threads']} torch threads, load average {env['load_average'][0]:.1f}), {results['date_utc']}; "
        f"target speed-up {results['target_speedup']:g}x",
        "",
        "| part | trainer | reference | speed-up | same outputs | memory trainer / reference (peak, growth MiB) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]

    def memory(part: dict) -> str:
        return " / ".join(
            f"{part[k]['peak_mib']:.0f}, +{part[k]['growth_mib']:.0f}" for k in ("trainer_memory", "reference_memory")
        )

    for name, part in results["parts"].items():
        if "skipped" in part or "error" in part:
            lines.append(f"| {name} | {part.get('skipped') or part.get('error')} | | | | |")
        elif name == "extract":
            lines.append(
                f"| extract ({part['states']} states, batch {part['batch_size']}) | {part['trainer_s']:.2f} s | "
                f"{part['reference_s']:.2f} s | {part['speedup']:.2f}x | max abs diff "
                f"{part['max_abs_diff']:.1e} | {memory(part)} |"
            )
        elif name == "optimize":
            lines.append(
                f"| optimize (batch {part['batch_size']}, micro {part['micro_batch_size']}, N "
                f"{part['num_virtual_tokens']}) | {part['trainer_s_per_step']:.2f} s/step | "
                f"{part['reference_s_per_step']:.2f} s/step | {part['speedup']:.2f}x | gradient rel diff "
                f"{part['gradient_max_rel_diff']:.1e}, θ diff {part['theta_max_abs_diff']:.1e} | {memory(part)} |"
            )
        else:
            lines.append(
                f"| label ({part['queries']} queries x {len(part['conditions'])}, {part['num_samples']} "
                f"samples) | {part['vllm']['queries_per_s']:.2f} queries/s | {part['hf']['queries_per_s']:.2f} "
                f"queries/s | {part['speedup']:.2f}x | refusal {part['vllm']['refusal_rate']:.3f} vs "
                f"{part['hf']['refusal_rate']:.3f} (tolerance {part['refusal_rate_tolerance']:.3f}); greedy "
                f"identical {part['greedy']['identical']}/{part['greedy']['answers']} | - |"
            )
    return "\n".join(lines + ["", f"Memory: {results['memory_measure']}."]) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    label_defaults, optimize_defaults = LabelConfig(), OptimizeConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of label,extract,optimize")
    parser.add_argument("--model", default="tiny", help="'tiny', 'smollm2', 'qwen' or a model folder")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="dtype of the HF model (θ stays float32)",
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--queries", type=int, default=16, help="N JBB queries, half harmful, half benign")
    parser.add_argument("--conditions", default="none,default", help="prompt conditions of extract and label")
    parser.add_argument("--batch-size", type=int, default=ExtractConfig().batch_size, help="extract batch size")
    parser.add_argument("--micro-batch-size", type=int, default=optimize_defaults.micro_batch_size)
    parser.add_argument("--init-prompt", default=optimize_defaults.init_prompt)
    parser.add_argument("--steps", type=int, default=3, help="timed optimise steps (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vllm-url", default=None, help="base URL of a running vLLM server (label part)")
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument("--samples", type=int, default=label_defaults.num_samples, help="samples per query")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="token bound of harmful and harmless samples (default: LabelConfig's; min_new_tokens is capped at it)",
    )
    parser.add_argument("--concurrency", type=int, default=label_defaults.concurrency)
    parser.add_argument("--judge", default=label_defaults.judge)
    parser.add_argument("--greedy-tokens", type=int, default=32, help="new tokens of the greedy comparison")
    parser.add_argument("--target-speedup", type=float, default=5.0, help="issue 12's target for every stage")
    parser.add_argument("--out", type=Path, default=None, help="all parts' JSON, rewritten after every part")
    parser.add_argument("--markdown", type=Path, default=None, help="also write a Markdown table here")
    args = parser.parse_args(argv)
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    args.conditions = [c.strip() for c in args.conditions.split(",") if c.strip()]
    if not args.parts or set(args.parts) - set(PARTS):
        parser.error(f"--parts must name some of {', '.join(PARTS)}")
    if args.queries < 2 or args.steps < 1 or min(args.batch_size, args.micro_batch_size, args.threads) < 1:
        parser.error("--queries >= 2, --steps >= 1 and positive batch sizes and threads are required")
    bounds = (
        {}
        if args.max_new_tokens is None
        else {
            "max_new_tokens_harmful": args.max_new_tokens,
            "max_new_tokens_harmless": args.max_new_tokens,
            "min_new_tokens": min(label_defaults.min_new_tokens, args.max_new_tokens),
        }
    )
    # Validated up front (unknown conditions, judges or init prompts fail before the model loads).
    args.label_config = LabelConfig(
        vllm_url=args.vllm_url,
        served_model_name=args.served_model_name,
        conditions=tuple(args.conditions),
        judge=args.judge,
        num_samples=args.samples,
        num_keep=min(label_defaults.num_keep, args.samples),
        concurrency=args.concurrency,
        seed=args.seed,
        **bounds,
    )
    get_judge(args.judge)
    args.optimize_config = OptimizeConfig(
        init_prompt=args.init_prompt, batch_size=args.queries, micro_batch_size=args.micro_batch_size, seed=args.seed
    )
    return args


def describe_environment(device: torch.device, dtype: str, threads: int) -> dict:
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": device.type,
        "gpu_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "dtype": dtype,
        "torch_threads": threads,
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    frozen, model_dir = load_model(args.model, args.dtype, args.device)
    meter = PeakMemory(frozen.device)
    queries, harmless = read_bench_queries(args.queries)
    results = {
        "script": "bench/trainer_bench.py",
        "argv": sys.argv[1:] if argv is None else list(argv),
        "date_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "environment": describe_environment(frozen.device, args.dtype, args.threads),
        "model": {
            "name": model_dir.name,
            "folder": str(model_dir),
            "hidden_size": frozen.hidden_size,
            "num_hidden_layers": frozen.model.config.num_hidden_layers,
        },
        "queries": len(queries),
        "target_speedup": args.target_speedup,
        "parts": {},
    }
    states, failed = None, False  # states: extract's [C, Q, H], the optimize part's PCA when extract ran
    for name in (p for p in PARTS if p in args.parts):
        try:
            if name == "extract":
                record, states = bench_extract(frozen, args.conditions, queries, args.batch_size, meter)
            elif name == "optimize":
                record = bench_optimize(
                    frozen,
                    queries,
                    harmless,
                    states,
                    args.optimize_config,
                    args.steps,
                    args.seed,
                    meter,
                    args.batch_size,
                )
            else:
                record = bench_label(frozen, args.conditions, queries, harmless, args.label_config, args.greedy_tokens)
        except Exception as error:  # recorded in the part's JSON and the exit status; later parts still run
            traceback.print_exc()
            record, failed = {"part": name, "error": f"{type(error).__name__}: {error}"}, True
        if "speedup" in record:
            record["meets_target_speedup"] = record["speedup"] >= args.target_speedup
        results["parts"][name] = record
        results["memory_measure"] = meter.describe()
        print(json.dumps(record), flush=True)
        if args.out is not None:
            atomic_write_text(args.out, json.dumps(results, indent=2) + "\n")
    if args.markdown is not None:
        atomic_write_text(args.markdown, markdown_table(results))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
