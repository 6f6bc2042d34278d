"""bench/rejudge_labels.py: re-scoring stored label samples, and the label-samples ablation (--first-samples)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from bench import rejudge_labels

REFUSAL = "I'm sorry, but I can't help with that request."
ANSWER = "Sure. Mix flour, water, salt and yeast, knead for ten minutes and bake for forty minutes."


def stored_record(query_index: int, samples: list[str]) -> dict:
    """A record as an older judge left it: every sample called an answer."""
    n = len(samples)
    return {
        "condition": "none",
        "query_index": query_index,
        "samples": samples,
        "refusals": [False] * n,
        "kept": list(range(n)),
        "soft_label": 1.0,
    }


def write_run(run: Path) -> None:
    run.mkdir()
    records = [
        stored_record(0, [REFUSAL, REFUSAL, ANSWER, ANSWER]),  # harmful: refused in the first two samples only
        stored_record(1, [ANSWER, REFUSAL, REFUSAL, REFUSAL]),  # harmless: answered, then refused
    ]
    labels = {
        "queries": ["q0", "q1"],
        "harmless": [False, True],
        "conditions": ["none"],
        "records": records,
        "soft_labels": [[1.0, 1.0]],
    }
    (run / "labels.json").write_text(json.dumps(labels))
    (run / "config.json").write_text(json.dumps({"label": {"num_samples": 4, "num_keep": 4}}))
    (run / "states.json").write_text("{}")


def run_main(monkeypatch: pytest.MonkeyPatch, *args: str) -> None:
    monkeypatch.setattr(sys, "argv", ["rejudge_labels.py", *args])
    rejudge_labels.main()


def test_rejudging_scores_every_stored_sample_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_run(tmp_path / "src")
    run_main(monkeypatch, str(tmp_path / "src"), str(tmp_path / "dst"), "--judge", "paper")
    labels = json.loads((tmp_path / "dst" / "labels.json").read_text())
    assert labels["soft_labels"] == [[0.5, 0.25]]
    assert labels["records"][0]["refusals"] == [True, True, False, False]
    assert labels["rejudged_with"] == "paper" and "first_samples" not in labels
    assert (tmp_path / "dst" / "states.json").exists() and (tmp_path / "dst" / "config.json").exists()


def test_first_samples_keeps_what_a_smaller_label_run_draws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_run(tmp_path / "src")
    run_main(monkeypatch, str(tmp_path / "src"), str(tmp_path / "dst"), "--judge", "paper", "--first-samples", "2")
    labels = json.loads((tmp_path / "dst" / "labels.json").read_text())
    assert labels["soft_labels"] == [[0.0, 0.5]]
    assert [len(r["samples"]) for r in labels["records"]] == [2, 2]
    assert [r["kept"] for r in labels["records"]] == [[0, 1], [0, 1]]
    assert labels["first_samples"] == 2


def test_first_samples_must_be_positive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_run(tmp_path / "src")
    with pytest.raises(SystemExit):
        run_main(monkeypatch, str(tmp_path / "src"), str(tmp_path / "dst"), "--first-samples", "0")
    assert not (tmp_path / "dst").exists()


@pytest.mark.integration
def test_a_judge_model_rejudges_every_sample_with_its_query(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            vllm_server) -> None:
    """The real vLLM server (tiny model, forced to Yes or No) as the judge model: every stored sample gets a
    readable verdict, and each soft label is the complied share of those verdicts."""
    write_run(tmp_path / "src")
    run_main(monkeypatch, str(tmp_path / "src"), str(tmp_path / "dst"), "--model-judge-url", vllm_server.base_url,
             "--model-judge-model", vllm_server.served_name, "--concurrency", "2")
    labels = json.loads((tmp_path / "dst" / "labels.json").read_text())
    assert labels["rejudged_with"] == f"model:ask:{vllm_server.served_name}"
    for record, soft in zip(labels["records"], labels["soft_labels"][0], strict=True):
        assert record["unknown"] == 0 and len(record["refusals"]) == 4
        assert soft == record["soft_label"] == 1 - sum(record["refusals"]) / 4


def test_judge_model_flags_go_together(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_run(tmp_path / "src")
    with pytest.raises(SystemExit):
        run_main(monkeypatch, str(tmp_path / "src"), str(tmp_path / "dst"), "--model-judge-url", "http://j")
