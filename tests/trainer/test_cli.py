"""The CLI end to end on the tiny model: balance stop, forced run, artifact round trip into the
gateway's loader, resume, bad inputs with clear errors and no partial output, released-file import."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from safeprompt.artifact import ArtifactError, check_artifact_fits, load_artifact, read_model_info
from safeprompt.artifact_write import read_tensors
from safeprompt.files import sha256_text
from trainer.__main__ import main

FAST = ["--no-progress", "--set", "torch_threads=1", "--set", "label.backend=hf", "--set", "data.limit=2",
        "--set", "label.num_samples=2", "--set", "label.num_keep=2", "--set", "label.max_new_tokens_harmful=12",
        "--set", "label.max_new_tokens_harmless=12", "--set", "fit.num_folds=2", "--set", "fit.max_steps=200",
        "--set", "optimize.batch_size=4", "--set", "optimize.micro_batch_size=2", "--set", "optimize.epochs=2",
        "--set", "optimize.init_prompt=short", "--set", "extract.batch_size=4"]


def data_args(harmful: Path, harmless: Path) -> list[str]:
    return ["--set", f"data.harmful_file={harmful}", "--set", f"data.harmless_file={harmless}"]


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, tmp_path_factory):
    from tests.trainer.conftest import HARMFUL, HARMLESS

    folder = tmp_path_factory.mktemp("cli")
    harmful, harmless = folder / "harmful.txt", folder / "harmless.txt"
    harmful.write_text("\n".join(HARMFUL))
    harmless.write_text("\n".join(HARMLESS))
    run_dir = folder / "run"
    args = ["all", "--model-dir", str(tiny_model_dir), "--run-dir", str(run_dir), *FAST, *data_args(harmful, harmless)]
    first = main(args)
    balance_stop = {"code": first, "has_directions": (run_dir / "directions.safetensors").exists(),
                    "balance": json.loads((run_dir / "balance.json").read_text())}
    assert main(args + ["--force"]) == 0
    return run_dir, balance_stop, args + ["--force"]


def test_unbalanced_labels_stop_the_fit_with_an_explanation(trained_run):
    _, stop, _ = trained_run
    assert stop["code"] == 2 and not stop["has_directions"]
    assert stop["balance"]["failed_checks"] and stop["balance"]["refusal_rate"] < 0.05


def test_forced_artifact_round_trips_into_the_gateway_loader(trained_run, tiny_model_dir):
    from transformers import AutoTokenizer

    run_dir, _, _ = trained_run
    artifact = load_artifact(run_dir / "artifact")
    info = read_model_info(tiny_model_dir)
    check_artifact_fits(artifact, info)
    m = artifact.manifest
    assert m.forced and m.origin == "dro-trainer" and m.init_prompt == "short" and m.dtype == "bfloat16"
    assert m.chat_template_sha256 == info.chat_template_sha256 == sha256_text(
        AutoTokenizer.from_pretrained(tiny_model_dir).chat_template)
    soft = read_tensors(artifact)["soft_prompt"]
    assert soft.shape == (m.num_virtual_tokens, 256) and soft.dtype == torch.bfloat16
    assert artifact.tensors["pca_components"].shape == (256, 4) and artifact.tensors["refusal_bias"].shape == ()
    assert m.configs["optimize"]["epochs"] == 2 and len(m.data_hashes) == 2 and m.metrics["steps"] == 2
    # Extract and optimize both ran in bf16, so the reference states are reused and step 1 (θ = θ0)
    # has no drift beyond bf16 rounding (extract packs 4 rows, the optimiser 2, so the sums run in another
    # order); the health figures travel with the artifact.
    health = m.metrics["health"]
    assert m.metrics["training_dtype"] == "bfloat16" and 0 <= health["off_subspace_first"] < 1e-3
    assert health["off_subspace_first"] <= health["off_subspace_last"]
    assert isinstance(m.metrics["health"]["warnings"], list)
    # The answer-length check ran: greedy answers of the 2 + 2 training queries under θ0 and θ.
    optimize = json.loads((run_dir / "optimize.json").read_text())
    assert len(optimize["answers"]["init"]) == len(optimize["answers"]["trained"]) == 4
    assert m.metrics["health"]["harmless_words_init"] > 0 and "harmful_finished_trained" in m.metrics["health"]
    assert (run_dir / "plots" / "pca_queries.png").stat().st_size > 1000
    assert (run_dir / "plots" / "loss_curves.png").stat().st_size > 1000


def test_rerun_resumes_from_outputs(trained_run, capsys):
    run_dir, _, args = trained_run
    before = (run_dir / "soft_prompt.safetensors").stat().st_mtime_ns
    assert main(args) == 0
    captured = capsys.readouterr()
    err = captured.err
    assert err.count("done earlier, skipped") == 5
    # The summary shows the training-health warnings: labels that are all "complied" give no direction.
    assert "WARNING: weak refusal direction" in captured.out
    assert (run_dir / "soft_prompt.safetensors").stat().st_mtime_ns == before


def test_mismatched_artifact_is_refused(trained_run, tiny_model_dir, tmp_path):
    run_dir, _, _ = trained_run
    artifact = load_artifact(run_dir / "artifact")
    other = tmp_path / "other-model"
    shutil.copytree(tiny_model_dir, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "hidden_size": 128}))
    with pytest.raises(ArtifactError, match="hidden size"):
        check_artifact_fits(artifact, read_model_info(other))
    (other / "config.json").write_text(json.dumps(config))
    (other / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    with pytest.raises(ArtifactError, match="chat template"):
        check_artifact_fits(artifact, read_model_info(other))


def test_empty_query_file_is_a_clear_error_and_writes_nothing(tiny_model_dir, tmp_path, capsys):
    harmful, harmless = tmp_path / "harmful.txt", tmp_path / "harmless.txt"
    harmful.write_text("\n\n")
    harmless.write_text("one\n")
    run_dir = tmp_path / "run"
    assert main(["label", "--model-dir", str(tiny_model_dir), "--run-dir", str(run_dir), *FAST,
                 *data_args(harmful, harmless)]) == 2
    assert "holds no queries" in capsys.readouterr().err
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json"]


def test_a_batch_size_that_does_not_divide_the_queries_stops_before_labelling(tiny_model_dir, tmp_path,
                                                                               query_files, capsys):
    run_dir = tmp_path / "run"  # 4 + 4 queries, batches of 3
    assert main(["all", "--model-dir", str(tiny_model_dir), "--run-dir", str(run_dir), *FAST,
                 "--set", "data.limit=4", "--set", "optimize.batch_size=3", *data_args(*query_files)]) == 2
    err = capsys.readouterr().err
    assert "8 training queries is not a multiple of optimize.batch_size 3" in err and "largest below 3 is 2" in err
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json"]  # nothing sampled


def test_model_without_chat_template_is_a_clear_error(tiny_model_dir, tmp_path, query_files, capsys):
    model = tmp_path / "no-template"
    shutil.copytree(tiny_model_dir, model)
    (model / "chat_template.jinja").unlink(missing_ok=True)
    tokenizer_config = json.loads((model / "tokenizer_config.json").read_text())
    tokenizer_config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    run_dir = tmp_path / "run"
    assert main(["extract", "--model-dir", str(model), "--run-dir", str(run_dir), *FAST, *data_args(*query_files)]) == 2
    assert "no chat template" in capsys.readouterr().err
    assert not (run_dir / "states.safetensors").exists() and not (run_dir / "extract.done.json").exists()


def test_invalid_config_is_refused_up_front(tiny_model_dir, tmp_path, capsys):
    assert main(["fit", "--model-dir", str(tiny_model_dir), "--run-dir", str(tmp_path / "r"),
                 "--set", "label.num_keep=30"]) == 2
    assert "num_keep (30) > num_samples (25)" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_import_released_wraps_a_bf16_file(tiny_model_dir, tmp_path, capsys):
    released = tmp_path / "type.all_length.short.safetensors"
    save_file({"soft_prompt": torch.randn(23, 256).bfloat16()}, str(released))
    out = tmp_path / "imported"
    assert main(["import-released", "--file", str(released), "--model-dir", str(tiny_model_dir),
                 "--name", "dro-paper", "--init-prompt", "short", "--out", str(out)]) == 0
    artifact = load_artifact(out)
    check_artifact_fits(artifact, read_model_info(tiny_model_dir))
    soft = read_tensors(artifact)["soft_prompt"]
    assert artifact.manifest.origin == "paper-release" and soft.dtype == torch.bfloat16
    assert soft.shape == (23, 256)
    wrong = tmp_path / "wrong.safetensors"
    save_file({"soft_prompt": torch.randn(23, 4096).bfloat16()}, str(wrong))
    assert main(["import-released", "--file", str(wrong), "--model-dir", str(tiny_model_dir),
                 "--out", str(tmp_path / "bad")]) == 2
    assert "hidden size" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_a_new_judge_revision_labels_again(trained_run, monkeypatch):
    """Labels judged by an older revision of the judge's rules are not reused under the same name."""
    from trainer import pipeline
    from trainer.__main__ import build_config, parse_args

    _, _, args = trained_run
    config = build_config(parse_args(args))
    before = pipeline.stage_keys(config)
    monkeypatch.setattr(pipeline, "judge_revision", lambda name: "a-newer-revision")
    after = pipeline.stage_keys(config)
    assert before["label"] != after["label"] and before["optimize"] != after["optimize"]
    assert before["extract"] == after["extract"]
