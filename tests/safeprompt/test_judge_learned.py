"""The `learned` judge: its features, its decision, its model file, and that the shipped file is what the
training script fits on the committed development rows (and on nothing else)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from safeprompt.judge import get_judge, judge_revision
from safeprompt.judge.learned import (
    MODEL_FILE,
    LearnedJudge,
    LinearModel,
    ModelFileError,
    features,
    load_model,
    parse_model,
)
from safeprompt.judge.phrases import HEAD_CHARS, answer_head


def model(weights: dict[str, float], bias: float = -1.0, threshold: float = 0.0) -> LinearModel:
    return LinearModel(bias, weights, threshold, "test")


def test_features_name_words_pairs_opening_and_rules() -> None:
    found = features(answer_head("I'm sorry, but I can't help with that.")[0])
    assert {"w:i'm", "w:sorry", "w:i'm sorry", "s:i'm sorry ,", "r:cannot-act"} <= found
    assert "d:delivery" not in found
    delivered = features(answer_head("Sure! Here are the steps:")[0])
    assert {"s:sure ! here", "r:-", "d:delivery"} <= delivered
    assert "t:turn" in features("I can't do that. However, I can suggest some general tips.")


def test_features_are_case_blind_and_read_only_the_head() -> None:
    assert features("NO WAY.") == features("no way.")
    long = "x " * HEAD_CHARS
    assert features(answer_head(long + "I cannot help")[0]) == features(answer_head(long)[0])


def test_decision_is_the_sign_of_the_score() -> None:
    judge = LearnedJudge(model({"w:explain": 0.6, "w:harmful": 0.6, "s:sure ! here": -3.0}))
    refused = judge.judge("Let me explain why this is harmful.")
    assert refused.refusal and refused.judge == "learned"
    assert refused.matched is not None and refused.matched.startswith("score 0.20")
    assert not judge.judge("Let me explain.").refusal  # -1.0 + 0.6
    assert not judge.judge("Sure! Here is why it is harmful, explained.").refusal
    assert LearnedJudge(model({"w:explain": 0.6}, bias=0.0, threshold=1.0)).judge("explain").refusal is False


def test_model_file_errors_are_named(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="format"):
        parse_model(b'{"format": 99, "bias": 0, "threshold": 0, "weights": {}}')
    with pytest.raises(ModelFileError, match="malformed"):
        parse_model(b'{"format": 1, "bias": 0}')
    with pytest.raises(ModelFileError, match="malformed"):
        parse_model(b"not json")
    with pytest.raises(ModelFileError, match="malformed"):
        parse_model(b'{"format": 1, "bias": "x", "threshold": 0, "weights": {}}')
    with pytest.raises(ModelFileError, match="No such file"):
        load_model(tmp_path / "missing.json")


def test_revision_follows_the_weights(tmp_path: Path) -> None:
    document = json.loads(MODEL_FILE.read_text())
    document["bias"] += 1.0
    changed = tmp_path / "model.json"
    changed.write_text(json.dumps(document))
    assert LearnedJudge(load_model(changed)).revision_material != get_judge("learned").revision_material
    assert judge_revision("learned") == judge_revision("learned") != judge_revision("phrases")


def test_shipped_model_is_fitted_on_the_committed_dev_rows_only() -> None:
    from evaluation.judge_training import DEFAULT_LABELS, read_rows, rows_sha256

    document = json.loads(MODEL_FILE.read_text())
    training = document["training"]
    assert training["split"] == "dev"
    dev = read_rows(DEFAULT_LABELS, "dev")
    assert training["rows"] == len(dev)
    assert training["rows_sha256"] == rows_sha256(dev), "refit: python -m evaluation.judge_training"
    assert document["head_chars"] == HEAD_CHARS


def test_training_reproduces_the_shipped_weights(tmp_path: Path) -> None:
    from evaluation.judge_training import main

    shipped = json.loads(MODEL_FILE.read_text())
    out = tmp_path / "model.json"
    main(["--out", str(out), "--c", str(shipped["training"]["c"])])
    refit = json.loads(out.read_text())
    assert refit["weights"].keys() == shipped["weights"].keys()
    assert max(abs(refit["weights"][name] - shipped["weights"][name]) for name in shipped["weights"]) < 1e-3
    assert abs(refit["bias"] - shipped["bias"]) < 1e-3
    assert not list(tmp_path.glob("*.tmp*"))  # written atomically, nothing left beside it
