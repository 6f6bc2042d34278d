"""Label-stage pieces: the authors' post-processing, keeping the longest samples, soft labels."""

from __future__ import annotations

import json

import pytest

from safeprompt.judge import PaperMatcher
from trainer.__main__ import main
from trainer.label import score_samples


def test_soft_label_is_the_complied_share_of_the_longest_samples():
    samples = ["I cannot help with that request at all, sorry.", "Sure, here is how you do it step by step.",
               "Ok.", "I'm sorry, I can't do that."]
    record = score_samples("none", 3, samples, PaperMatcher(), num_keep=2)
    assert record.kept == [0, 1]  # the two longest by whitespace words
    assert record.refusals == [True, False, False, True]
    assert record.soft_label == 0.5 and record.condition == "none" and record.query_index == 3


@pytest.mark.integration
@pytest.mark.parametrize("stop_when_judged", [False, True])
def test_vllm_label_backend_against_the_real_server(vllm_server, tiny_model_dir, query_files, tmp_path,
                                                    stop_when_judged):
    harmful, harmless = query_files
    run_dir = tmp_path / "run"
    code = main(["label", "--model-dir", str(tiny_model_dir), "--run-dir", str(run_dir), "--no-progress",
                 "--set", f"data.harmful_file={harmful}", "--set", f"data.harmless_file={harmless}",
                 "--set", "data.limit=1", "--set", "label.conditions=[none, short]",
                 "--set", f"label.vllm_url={vllm_server.base_url}",
                 "--set", f"label.served_model_name={vllm_server.served_name}",
                 "--set", "label.num_samples=2", "--set", "label.num_keep=2",
                 "--set", "label.max_new_tokens_harmful=16", "--set", "label.max_new_tokens_harmless=16",
                 "--set", f"label.stop_when_judged={str(stop_when_judged).lower()}"])
    assert code == 0
    labels = json.loads((run_dir / "labels.json").read_text())
    assert labels["conditions"] == ["none", "short"] and len(labels["records"]) == 4
    assert all(len(r["samples"]) == 2 and all(s for s in r["samples"]) for r in labels["records"])
    assert all(value in (0.0, 0.5, 1.0) for row in labels["soft_labels"] for value in row)
    assert not (run_dir / "labels.partial.jsonl").exists()
