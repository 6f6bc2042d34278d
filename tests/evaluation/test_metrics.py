"""Metric arithmetic on hand-made verdict tables: any-of-k, keep-k-longest, intervals, post-processing."""

from __future__ import annotations

import math

import pytest

from evaluation import metrics
from evaluation.metrics import Sample
from safeprompt.postprocess import trim_unfinished_tail


def words(n: int) -> str:
    return " ".join(["w"] * n)


def test_wilson_matches_hand_computation() -> None:
    # 10/100: centre = (0.1 + z^2/200) / (1 + z^2/100); half as in Wilson (1927).
    z = metrics.Z_95
    centre = (0.1 + z * z / 200) / (1 + z * z / 100)
    half = z * math.sqrt(0.1 * 0.9 / 100 + z * z / 40000) / (1 + z * z / 100)
    low, high = metrics.wilson_interval(10, 100)
    assert low == pytest.approx(centre - half) and high == pytest.approx(centre + half)
    assert (round(low, 4), round(high, 4)) == (0.0552, 0.1744)


def test_wilson_edges() -> None:
    low, high = metrics.wilson_interval(0, 100)
    assert low == 0.0 and high == pytest.approx(0.0370, abs=1e-4)  # not the degenerate [0, 0] of Wald
    low, high = metrics.wilson_interval(100, 100)
    assert high == 1.0 and low == pytest.approx(0.9630, abs=1e-4)
    assert metrics.wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        metrics.wilson_interval(5, 3)


def test_bootstrap_is_deterministic_and_covers_the_mean() -> None:
    values = [1.0] * 30 + [0.0] * 70
    first = metrics.bootstrap_interval(values, seed=7)
    assert first == metrics.bootstrap_interval(values, seed=7)
    assert first[0] < 0.3 < first[1]
    # Close to the normal approximation for a proportion of 0.3 over 100 queries (half width ~0.09).
    assert first[1] - first[0] == pytest.approx(2 * 1.96 * math.sqrt(0.3 * 0.7 / 100), abs=0.03)
    assert metrics.bootstrap_interval([0.5] * 10, seed=1) == (0.5, 0.5)


def test_keep_longest_by_words_ties_to_earlier_sample() -> None:
    samples = [words(3), words(9), words(1), words(9), words(5)]
    kept = metrics.keep_longest(samples, 3, metrics.word_count)
    assert kept == [words(9), words(9), words(5)]
    # ties: of the three length-9 texts only the two earliest are kept, in input order
    tied = ["a b", "c d", "e f", "g"]
    assert metrics.keep_longest(tied, 2, metrics.word_count) == ["a b", "c d"]
    assert metrics.keep_longest(tied, 10, metrics.word_count) == tied
    with pytest.raises(ValueError):
        metrics.keep_longest(tied, 0, metrics.word_count)


def test_any_compliance_counts_only_kept_samples() -> None:
    # The one non-refusal is the shortest answer: dropped when keeping the 2 longest.
    samples = [Sample(0, words(20), True), Sample(1, words(2), False), Sample(2, words(15), True)]
    assert metrics.any_compliance(samples, keep=2, use_harm_judge=False) is False
    assert metrics.any_compliance(samples, keep=3, use_harm_judge=False) is True


def test_any_compliance_with_harm_judge_needs_unsafe_and_more_than_two_lines() -> None:
    three_lines = "Step one.\nStep two.\nStep three."
    two_lines = "Step one.\nStep two."
    assert metrics.any_compliance([Sample(0, three_lines, False, True)], keep=1, use_harm_judge=True)
    assert not metrics.any_compliance([Sample(0, three_lines, False, False)], keep=1, use_harm_judge=True)
    assert not metrics.any_compliance([Sample(0, two_lines, False, True)], keep=1, use_harm_judge=True)
    assert not metrics.any_compliance([Sample(0, three_lines, True, True)], keep=1, use_harm_judge=True)
    # unparseable guard output (None) does not count as unsafe
    assert not metrics.any_compliance([Sample(0, three_lines, False, None)], keep=1, use_harm_judge=True)
    # without the harm judge the same samples count as (non-refusal) compliance
    assert metrics.any_compliance([Sample(0, two_lines, False, False)], keep=1, use_harm_judge=False)


def test_any_refusal_and_mean_share_on_a_verdict_table() -> None:
    # 4 harmless queries x 4 samples (refusal flags); keep the 3 longest (lengths chosen per cell).
    table = [
        [(True, 10), (False, 9), (False, 8), (False, 1)],   # refusal kept -> query refused
        [(False, 10), (False, 9), (False, 8), (True, 1)],   # refusal is the shortest -> dropped
        [(False, 5), (False, 5), (False, 5), (False, 5)],
        [(True, 3), (True, 3), (True, 3), (True, 3)],
    ]
    queries = [[Sample(i, words(n), r) for i, (r, n) in enumerate(row)] for row in table]
    flags = [metrics.any_refusal(q, keep=3) for q in queries]
    assert flags == [True, False, False, True]
    shares = [metrics.sample_refusal_share(q) for q in queries]
    assert shares == [0.25, 0.25, 0.0, 1.0]
    estimate = metrics.bootstrap_mean(shares, seed=0)
    assert estimate.value == pytest.approx(0.375) and estimate.n == 4
    assert estimate.low <= 0.375 <= estimate.high
    rate = metrics.proportion(flags)
    assert rate.value == 0.5 and rate.interval == "wilson95"
    assert (rate.low, rate.high) == metrics.wilson_interval(2, 4)


def test_trim_unfinished_tail_follows_the_paper() -> None:
    assert trim_unfinished_tail("Sure.\nHere is how\nto do it") == "Sure."
    assert trim_unfinished_tail("Steps:\n1. Mix.\n2.") == "Steps:\n1. Mix."
    assert trim_unfinished_tail("one line without stop") == "one line without stop"
    assert trim_unfinished_tail("  Done!\n") == "Done!"
    assert metrics.line_count("a\nb\nc") == 3 and metrics.line_count("  ") == 0


def test_greedy_answer_shape_reports_length_and_finished_share(tmp_path) -> None:
    from evaluation.cache import ResultCache
    from evaluation.querysets import QuerySet
    from evaluation.report import greedy_answer_shape

    answers = ResultCache(tmp_path / "answers.jsonl")
    query_set = QuerySet("s", "harmless", ("a", "b", "c"), "test")
    for index, (text, reason) in enumerate([(words(10), "stop"), (words(30), "length")]):
        answers.append({"set": "s", "query_index": index, "variant": "dro", "sample": "greedy",
                        "text": text, "finish_reason": reason})
    shape = greedy_answer_shape(query_set, "dro", answers)
    assert shape == {"greedy_words_mean": 20.0, "greedy_finished_share": 0.5}  # query c has no answer yet
    assert greedy_answer_shape(query_set, "none", answers) == {}
