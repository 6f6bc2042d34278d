"""Label-stage pieces: the authors' post-processing, keeping the longest samples, soft labels."""

from __future__ import annotations

from gateway.judge import PaperMatcher
from trainer.label import clean_response, score_samples


def test_clean_response_drops_unfinished_trailing_lines():
    assert clean_response("  Sure.\nHere is\n") == "Sure."
    assert clean_response("Steps:\n1. Mix.\n2.") == "Steps:\n1. Mix."
    assert clean_response("one line without end") == "one line without end"


def test_soft_label_is_the_complied_share_of_the_longest_samples():
    samples = ["I cannot help with that request at all, sorry.", "Sure, here is how you do it step by step.",
               "Ok.", "I'm sorry, I can't do that."]
    record = score_samples("none", 3, samples, PaperMatcher(), num_keep=2)
    assert record.kept == [0, 1]  # the two longest by whitespace words
    assert record.refusals == [True, False, False, True]
    assert record.soft_label == 0.5 and record.condition == "none" and record.query_index == 3
