"""The request-aware probe bench: its prompt, its model-free selection, and features from a real (tiny) model."""

from __future__ import annotations

import numpy as np

from bench.judge_probe import ANSWER_CHARS, REQUEST_CHARS, extract_features, judge_messages, load_or_extract, run


def synthetic(n_per: int = 24, layers: int = 4, hidden: int = 8, informative: int = 2, seed: int = 0):
    """Rows of two groups in dev and test; only layer `informative` carries the label (first coordinate)."""
    rng = np.random.default_rng(seed)
    rows, features = [], []
    for group in ("qwen25coder05b", "smollm2"):
        for split in ("dev", "test"):
            for i in range(n_per):
                refusal = i % 3 == 0
                rows.append({"id": f"{group}-{split}-{i}", "group": group, "split": split, "refusal": refusal,
                             "prompt": "Write something.", "response": "Sure, here it is: ..."})
                x = rng.normal(size=(layers + 1, hidden))
                x[informative, 0] += 4.0 if refusal else -4.0
                features.append(x)
    return rows, np.stack(features)


def test_prompt_holds_request_and_answer_cut_to_their_lengths() -> None:
    messages = judge_messages("R" * (REQUEST_CHARS + 50), "A" * (ANSWER_CHARS + 50))
    user = messages[-1]["content"]
    assert messages[0]["role"] == "system" and messages[-1]["role"] == "user"
    assert "R" * REQUEST_CHARS in user and "R" * (REQUEST_CHARS + 1) not in user
    assert "A" * ANSWER_CHARS in user and "A" * (ANSWER_CHARS + 1) not in user
    assert user.index("[REQUEST]") < user.index("[RESPONSE]")


def test_selection_finds_the_informative_layer_and_never_reads_test_labels() -> None:
    rows, features = synthetic()
    result = run(rows, features)
    assert result["selected"]["layer"] == 2
    probe = result["test"]["probe"]
    assert probe["qwen25coder05b"]["agreement"] > 0.9 and probe["smollm2"]["agreement"] > 0.9
    # The phrase judge calls every "Sure, here it is" an answer: it agrees on exactly the non-refusals.
    assert result["test"]["phrases"]["smollm2"]["agree"] == 16
    # Flip every test label: the selection and the probe's verdicts stay, only the scores invert.
    flipped = [dict(row, refusal=not row["refusal"]) if row["split"] == "test" else row for row in rows]
    again = run(flipped, features)
    assert again["selected"] == result["selected"]
    for group in ("qwen25coder05b", "smollm2"):
        assert again["test"]["probe"][group]["agree"] == 24 - probe[group]["agree"]


def test_features_from_a_real_model_are_cached_by_rows(tiny_model_dir, tmp_path) -> None:
    rows = [{"id": "1", "prompt": "How do I bake bread?", "response": "Mix flour and water."},
            {"id": "2", "prompt": "How do I pick a lock?", "response": "I'm sorry, but I can't help with that."}]
    features, per_row = extract_features(tiny_model_dir, rows, threads=1)
    assert features.shape == (2, 3, 256) and per_row > 0  # tiny Llama: 2 layers + embeddings, hidden 256
    assert not np.allclose(features[0], features[1])
    cache = tmp_path / "features.npz"
    first, _ = load_or_extract(tiny_model_dir, rows, cache, threads=1)
    np.testing.assert_allclose(first, features, rtol=1e-5)
    # A cached file is reused for the same rows (proved by tampering with it) and ignored for others.
    stored = dict(np.load(cache))
    np.savez(cache, **{**stored, "features": stored["features"] * 0})
    reused, _ = load_or_extract(tiny_model_dir, rows, cache, threads=1)
    assert not reused.any()
    changed = [rows[0], dict(rows[1], response="Here is how: ...")]
    fresh, _ = load_or_extract(tiny_model_dir, changed, cache, threads=1)
    assert fresh.any() and fresh.shape == (2, 3, 256)


def test_learning_curve_fits_on_shares_of_dev_rows_and_scores_test_rows() -> None:
    rows, features = synthetic()
    curve = run(rows, features)["learning_curve"]
    assert [point["dev_rows"] for point in curve] == [12, 24, 36, 48]
    for point in curve:
        assert set(point["test_agreement"]) == {"qwen25coder05b", "smollm2"}
    assert curve[-1]["test_agreement"]["smollm2"] > 0.9  # the informative layer separates them
