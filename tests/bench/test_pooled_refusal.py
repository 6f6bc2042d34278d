"""The paired statistics of bench/pooled_refusal.py (the held-out figures of docs/trainer.md rest on them)."""

from __future__ import annotations

import pytest

from bench.pooled_refusal import mcnemar_exact, paired_difference_interval


def test_paired_difference_interval_by_hand() -> None:
    # d = -6/200; var = 24/200^2 - 36/200^3 = 5.955e-4; 1.96 * sqrt(var) = 0.04783
    low, high = paired_difference_interval(9, 15, 200)
    assert (low, high) == pytest.approx((-0.07783, 0.01783), abs=1e-5)
    assert paired_difference_interval(15, 9, 200) == pytest.approx((-high, -low))
    assert paired_difference_interval(0, 0, 50) == (0.0, 0.0)
    assert paired_difference_interval(0, 0, 0) == (0.0, 0.0)


def test_mcnemar_exact_known_values() -> None:
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 3) == pytest.approx(0.25)  # 2 * (1/8)
    assert mcnemar_exact(9, 15) == pytest.approx(0.3075, abs=1e-4)
