"""The trainer benchmark's parts on the tiny model: the trainer's paths and the reference loops agree.

Behaviour only, never timing: batched extraction = the per-query loop (float32), the trainer's
micro-batched gradient = the batch-of-one loop's, the same losses and θ after the steps; the label part
is skipped without a server and, against an in-process fake server, reports the checks it makes.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import torch

from bench.trainer_bench import (
    PeakMemory,
    bench_extract,
    bench_label,
    bench_optimize,
    main,
    read_bench_queries,
    reference_soft_prompt_state,
)
from trainer.config import LabelConfig, OptimizeConfig
from trainer.optimize import soft_prompt_states


@pytest.fixture(autouse=True)
def single_thread_torch():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def frozen(tiny_model_dir: Path):
    from trainer.model import load_frozen_model

    return load_frozen_model(tiny_model_dir)


@pytest.fixture(scope="module")
def queries() -> tuple[list[str], torch.Tensor]:
    return read_bench_queries(3)  # 2 harmful, 1 benign


@pytest.fixture(scope="module")
def extracted(frozen, queries):
    qs, _ = queries
    return bench_extract(frozen, ["none", "short"], qs, 2, PeakMemory(frozen.device))


def test_batched_extraction_matches_the_per_query_loop(extracted, frozen):
    record, states = extracted
    assert states.shape == (2, 3, frozen.hidden_size) and states.dtype == torch.float32
    assert record["states"] == 6 and record["max_abs_diff"] < 1e-4
    passes = record["token_passes"]  # 2 conditions x batches of 2 and 1: the batch of 2 shares its prefix
    assert 0 < passes["trainer_tokens"] < passes["reference_tokens"] and passes["ratio"] > 1
    for key in ("trainer_s", "reference_s", "speedup"):
        assert record[key] > 0
    assert record["trainer_memory"]["peak_mib"] > 0


def test_reference_splice_matches_the_trainers(frozen, queries):
    qs, _ = queries
    theta = torch.randn(5, frozen.hidden_size, generator=torch.Generator().manual_seed(0)) * 0.02
    with torch.no_grad():
        batched = soft_prompt_states(frozen, theta, qs)  # [Q, H], one batch: prefix shared, rows packed
        one_by_one = torch.stack([reference_soft_prompt_state(frozen, theta, q) for q in qs])
    assert torch.allclose(batched, one_by_one, atol=1e-4)


def test_micro_batched_gradient_matches_the_batch_of_one_loop(extracted, frozen, queries):
    qs, harmless = queries
    _, states = extracted
    config = OptimizeConfig(init_prompt="short", batch_size=3, micro_batch_size=2)  # micro-batches of 2 + 1
    record = bench_optimize(frozen, qs, harmless, states, config, 2, 0, PeakMemory(frozen.device), 2)
    assert record["geometry"].startswith("fit_pca") and record["num_virtual_tokens"] > 5
    assert len(record["trainer_losses"]) == len(record["reference_losses"]) == 3
    assert record["gradient_max_rel_diff"] < 1e-4 and record["gradient_cosine"] > 1 - 1e-6
    assert record["loss_max_abs_diff"] < 1e-5
    # Adam divides each element by its own gradient scale, so elements with near-zero gradients move on
    # float rounding alone (by up to lr = 1e-3 a step): equal trajectories, up to that.
    assert record["theta_max_abs_diff"] < 1e-4
    assert record["trainer_losses"][-1] != record["trainer_losses"][0]  # θ moved: the steps were taken


def test_label_part_is_skipped_without_a_server(frozen, queries):
    qs, harmless = queries
    record = bench_label(frozen, ["none"], qs, harmless, LabelConfig(), 8)
    assert record["part"] == "label" and "--vllm-url" in record["skipped"]


def fake_vllm(request: httpx.Request) -> httpx.Response:
    """A server that refuses everything: streamed samples, whole greedy answers, its model list."""
    if request.url.path.endswith("/models"):
        return httpx.Response(200, json={"data": [{"id": "tiny"}]})
    text = "I cannot help with that."
    if json.loads(request.content).get("stream"):
        event = {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": "stop"}]}
        body = f"data: {json.dumps(event)}\n\ndata: [DONE]\n\n"
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body.encode())
    return httpx.Response(200, json={"choices": [{"message": {"content": text}, "finish_reason": "stop"}]})


def test_label_part_reports_counts_bounds_and_a_refusal_gap(frozen, queries):
    qs, harmless = queries
    config = LabelConfig(
        vllm_url="http://fake-vllm",
        served_model_name="tiny",
        num_samples=4,  # 8 samples a side: enough for 3 standard errors to tell 0 % from 100 %
        num_keep=2,
        min_new_tokens=2,
        max_new_tokens_harmful=6,
        max_new_tokens_harmless=6,
        concurrency=2,
    )
    record = bench_label(frozen, ["none"], qs[:2], harmless[:2], config, 4, transport=httpx.MockTransport(fake_vllm))
    assert record["vllm"]["samples"] == record["hf"]["samples"] == 8 and record["same_sample_counts"]
    # Counted by re-tokenising the cleaned text; a random model's byte fragments may re-tokenise longer.
    assert record["vllm"]["samples_over_token_bound"] == 0 and record["hf"]["longest_sample_tokens"] > 0
    # The fake refuses every sample and the random tiny model none: a gap the tolerance must not hide.
    assert record["vllm"]["refusal_rate"] == 1.0 and record["hf"]["refusal_rate"] == 0.0
    assert not record["refusal_rate_within_tolerance"]
    assert record["greedy"]["answers"] == 2 and record["greedy"]["identical"] == 0


def test_command_writes_every_part(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out, markdown = tmp_path / "bench.json", tmp_path / "bench.md"
    status = main(
        [
            "--model",
            str(tiny_model_dir),
            "--queries",
            "2",
            "--parts",
            "label,optimize",
            "--init-prompt",
            "short",
            "--steps",
            "1",
            "--out",
            str(out),
            "--markdown",
            str(markdown),
        ]
    )
    results = json.loads(out.read_text())
    assert status == 0 and list(results["parts"]) == ["optimize", "label"]
    assert results["parts"]["optimize"]["geometry"] == "random orthonormal basis"
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [p["part"] for p in printed] == ["optimize", "label"] and "skipped" in printed[1]
    rows = [
        line
        for line in markdown.read_text().splitlines()
        if line.startswith("| optimize") or line.startswith("| label")
    ]
    assert len(rows) == 2 and "--vllm-url" in rows[1]
