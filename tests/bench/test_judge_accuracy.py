"""The judge accuracy bench: its statistics, and the labelled set it reads."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from bench.judge_accuracy import DEFAULT_LABELS, Scores, evaluate, read_labels, string_judge, wilson_interval


def test_wilson_interval_known_values() -> None:
    # Reference values (Wilson score interval, z = 1.96), e.g. Newcombe (1998) table I.
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_scores_arithmetic() -> None:
    scores = Scores("j", "dev", "all", n=10, tp=3, fp=1, fn=2, tn=4)
    assert scores.precision == 0.75 and scores.recall == 0.6 and scores.agreement == 0.7
    assert scores.f1 == pytest.approx(2 * 0.75 * 0.6 / 1.35)
    assert Scores("j", "dev", "all", n=2, tp=0, fp=0, fn=0, tn=2).precision is None


def test_labelled_set_is_well_formed() -> None:
    rows = read_labels(DEFAULT_LABELS)
    ids = [row["id"] for row in rows]
    assert len(ids) == len(set(ids)) and len(rows) >= 300
    assert Counter(row["split"] for row in rows).keys() == {"dev", "test"}
    for split in ("dev", "test"):
        labels = Counter(row["refusal"] for row in rows if row["split"] == split)
        assert labels[True] >= 20 and labels[False] >= 20, (split, labels)
    groups = Counter(row["group"] for row in rows)
    assert groups["smollm2"] >= 100 and groups["qwen25coder05b"] >= 250
    assert {row["group"] for row in rows} >= {"smollm2", "jbb_llama", "jbb_vicuna", "qwen25coder05b"}
    qwen = [row for row in rows if row["group"] == "qwen25coder05b"]
    # A seeded random half of each (set, variant) stratum is held out, the DRO variant included.
    for split in ("dev", "test"):
        labels = Counter(row["refusal"] for row in qwen if row["split"] == split)
        assert labels[True] >= 25 and labels[False] >= 80, (split, labels)
    held_out = {row["condition"] for row in qwen if row["split"] == "test" and "-style-" not in row["id"]}
    assert held_out == {"none", "default", "short", "mistral", "dro"}
    # Style answers: every style and both models held out, each split with refusals and answers.
    for group in ("qwen25coder05b", "smollm2"):
        style = [row for row in rows if row["group"] == group and "-style-" in row["id"]]
        for split in ("dev", "test"):
            conditions = {row["condition"] for row in style if row["split"] == split}
            assert conditions == {"explain", "redirect", "terse", "persona", "default", "mistral"}, (group, split)
            labels = Counter(row["refusal"] for row in style if row["split"] == split)
            assert labels[True] >= 10 and labels[False] >= 40, (group, split, labels)
    for row in rows:
        assert row["prompt"] and isinstance(row["response"], str)


def test_evaluate_counts_every_row(tmp_path) -> None:
    path = tmp_path / "labels.jsonl"
    rows = [
        {"id": "a", "split": "dev", "group": "g", "prompt": "p", "response": "I cannot help with that.",
         "refusal": True},
        {"id": "b", "split": "dev", "group": "g", "prompt": "p", "response": "Sure, here it is.", "refusal": False},
        {"id": "c", "split": "test", "group": "g", "prompt": "p", "response": "Sure.", "refusal": True},
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    results = {(s.split, s.group, s.judge): s for s in evaluate(read_labels(path), {"paper": string_judge("paper")})}
    assert (results[("dev", "g", "paper")].tp, results[("dev", "g", "paper")].tn) == (1, 1)
    assert results[("dev", "g", "paper")].agreement == 1.0 and results[("test", "g", "paper")].agreement == 0.0
    assert results[("test", "all", "paper")].fn == 1
    assert results[("all", "all", "paper")].n == 3


def test_bad_label_rows_are_rejected(tmp_path) -> None:
    path = tmp_path / "labels.jsonl"
    path.write_text(json.dumps({"id": "a", "response": "x", "refusal": "yes"}) + "\n")
    with pytest.raises(ValueError, match="labels.jsonl:1"):
        read_labels(path)


def test_audit_agreement_counts_per_group_and_rejects_unknown_ids() -> None:
    from bench.judge_accuracy import audit_agreement

    rows = [{"id": "a", "group": "g1", "refusal": True}, {"id": "b", "group": "g1", "refusal": False},
            {"id": "c", "group": "g2", "refusal": True}]
    audit = [{"id": "a", "refusal": True}, {"id": "b", "refusal": True}, {"id": "c", "refusal": True}]
    assert audit_agreement(rows, audit) == {"all": (2, 3), "g1": (1, 2), "g2": (1, 1)}
    with pytest.raises(ValueError, match="'zzz'"):
        audit_agreement(rows, [{"id": "zzz", "refusal": True}])
    with pytest.raises(ValueError, match="boolean"):
        audit_agreement(rows, [{"id": "a", "refusal": "yes"}])


def test_shipped_second_reading_covers_held_out_small_model_rows() -> None:
    from bench.judge_accuracy import audit_agreement

    rows = read_labels(DEFAULT_LABELS)
    path = DEFAULT_LABELS.parent / "audit-2026-12-03.jsonl"
    audit = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    by_id = {row["id"]: row for row in rows}
    assert len(audit) == 120 and len({second["id"] for second in audit}) == 120
    assert {by_id[second["id"]]["split"] for second in audit} == {"test"}
    assert {by_id[second["id"]]["group"] for second in audit} == {"qwen25coder05b", "smollm2"}
    # Every disagreement with the stored label carries a note saying why.
    for second in audit:
        if second["refusal"] != by_id[second["id"]]["refusal"]:
            assert second["note"], second["id"]
    agree, n = audit_agreement(rows, audit)["all"]
    assert (agree, n) == (118, 120)  # the figure docs/judges.md reports


@pytest.mark.integration
def test_model_judge_verdicts_are_cached_and_resumed(vllm_server, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """The tiny model stands in for the judge model (forced to Yes/No): every labelled row gets a readable
    verdict, kept by id in the cache; a rerun asks only for rows it has not judged."""
    from bench.judge_accuracy import model_verdicts
    from safeprompt.judge.model_judge import ModelJudgeSettings

    rows = read_labels(DEFAULT_LABELS)
    settings = ModelJudgeSettings(base_url=vllm_server.base_url, model=vllm_server.served_name, max_chars=300)
    cache = tmp_path / "verdicts.jsonl"
    first = model_verdicts(rows[:5], settings, cache, concurrency=2)
    assert list(first) == [row["id"] for row in rows[:5]]
    assert all(record["refusal"] in (True, False) for record in first.values())
    assert "asked 5 verdicts" in capsys.readouterr().out
    assert model_verdicts(rows[:5], settings, cache, concurrency=2) == first
    assert "asked" not in capsys.readouterr().out
    more = model_verdicts(rows[:7], settings, cache, concurrency=2)
    assert "asked 2 verdicts" in capsys.readouterr().out
    assert {key: more[key] for key in first} == first and len(cache.read_text().splitlines()) == 7
    edited = [{**rows[0], "response": rows[0]["response"] + " (edited)"}, *rows[1:7]]
    model_verdicts(edited, settings, cache, concurrency=2)  # a verdict is for the text it was asked about
    assert "asked 1 verdicts" in capsys.readouterr().out


def test_dev_threshold_is_fitted_on_dev_rows_only() -> None:
    from bench.judge_accuracy import dev_threshold

    rows = [{"id": str(i), "split": split, "refusal": label}
            for i, (split, label) in enumerate([("dev", True), ("dev", True), ("dev", False), ("dev", False),
                                                ("test", False), ("test", True)])]
    probabilities = [0.30, 0.25, 0.10, 0.20, 0.90, 0.01]  # test rows would pull a fit the other way
    verdicts = {row["id"]: {"p_refusal": p} for row, p in zip(rows, probabilities, strict=True)}
    assert dev_threshold(rows, verdicts) == pytest.approx(0.225)  # separates the dev rows exactly
    verdicts["0"]["p_refusal"] = None
    assert dev_threshold(rows, verdicts) is None
