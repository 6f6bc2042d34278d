"""The GPU trainer check, run on CPU at the tiny shape: it completes, and its JSON has every number, finite.

float32 and batches of 4 here: bf16 matrix products are ~10x slower than float32 on this CPU, and the point
is that the script's parts and records work, not the timings. The bf16 build path (the GPU default) is
checked separately on the model alone.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from bench.gpu_trainer_check import build_frozen_model, load_tokenizer, main


@pytest.fixture(autouse=True)
def single_thread_torch():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def positive_finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_cpu_tiny_run_writes_complete_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, markdown = tmp_path / "gpu_trainer.json", tmp_path / "gpu_trainer.md"
    status = main(["--shape", "tiny", "--device", "cpu", "--queries", "8", "--steps", "2", "--dtype", "float32",
                   "--threads", "1", "--extract-batch-sizes", "4,8", "--batch-size", "4",
                   "--micro-batch-sizes", "2,4", "--out", str(out), "--markdown", str(markdown)])
    results = json.loads(out.read_text())
    assert status == 0 and results["status"] == "complete" and results["errors"] == [], results["errors"]
    assert {"script", "date_utc", "environment", "model", "extract", "optimize", "memory_measure",
            "elapsed_s"} <= results.keys()
    env = results["environment"]
    assert env["torch"] == torch.__version__ and env["device"] == "cpu" and env["dtype"] == "float32"
    assert {"cuda", "gpu_name", "python", "transformers"} <= env.keys()

    model = results["model"]
    assert model["shape"] == "tiny" and model["hidden_size"] == 256 and model["num_hidden_layers"] == 2
    assert model["vocab_size"] == 49152 and positive_finite(model["num_parameters"])

    extract = results["extract"]
    assert extract["num_states"] == 4 * 8 and [run["batch_size"] for run in extract["runs"]] == [4, 8]
    for run in extract["runs"]:
        for key in ("seconds", "states_per_s", "queries_per_s", "peak_memory_gib"):
            assert positive_finite(run[key]), (key, run)
        assert run["states_per_s"] == pytest.approx(4 * run["queries_per_s"])

    optimize = results["optimize"]
    assert optimize["batch_size"] == 4 and optimize["timed_steps"] == 2
    assert optimize["num_virtual_tokens"] > 50  # the `default` prompt's in-context tokens (SmolLM2: 103)
    assert optimize["geometry"].startswith("fit_pca")
    assert [run["micro_batch_size"] for run in optimize["runs"]] == [2, 4]
    for run in optimize["runs"]:
        assert run["steps"] == 3  # one warm-up step + 2 timed
        for key in ("warmup_step_s", "seconds_per_step", "steps_per_s", "sequences_per_s", "peak_memory_gib",
                    "loss_first", "loss_last"):
            assert positive_finite(run[key]), (key, run)
        assert run["steps_per_s"] == pytest.approx(1 / run["seconds_per_step"])

    table = markdown.read_text()
    assert table in capsys.readouterr().out
    assert table.count("| extract |") == 2 and table.count("| optimise |") == 2


def test_bf16_model_is_built_in_bf16_with_the_asked_shape() -> None:
    tokenizer, _ = load_tokenizer(None)
    frozen, config = build_frozen_model(tokenizer, "tiny", torch.device("cpu"), torch.bfloat16, seed=0)
    dtypes = {p.dtype for p in frozen.model.parameters()}
    assert dtypes == {torch.bfloat16} and torch.get_default_dtype() == torch.float32  # default dtype restored
    assert frozen.hidden_size == 256 and config.num_attention_heads == 4 and config.intermediate_size == 512
    assert not config.tie_word_embeddings and not any(p.requires_grad for p in frozen.model.parameters())
    assert frozen.tokenizer.decode([frozen.sentinel_id]) == "<prompt_embeds>"
