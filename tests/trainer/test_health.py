"""Training health: the warnings a person sees before serving a weak run."""

from __future__ import annotations

import pytest
import torch

from trainer.health import majority_baseline, optimization_health, probe_health


def test_majority_baseline_is_the_share_of_the_common_side():
    assert majority_baseline(torch.tensor([1.0, 1.0, 0.9, 0.0])) == 0.75
    assert majority_baseline(torch.tensor([0.0, 0.2, 0.4, 1.0])) == 0.75


def test_a_probe_that_barely_beats_the_baseline_is_flagged():
    labels = torch.tensor([1.0] * 65 + [0.0] * 35)
    figures, warnings = probe_health("refusal", 0.668, labels)
    assert figures["refusal_majority_baseline"] == pytest.approx(0.65)
    assert len(warnings) == 1 and "weak refusal direction" in warnings[0]
    _, good = probe_health("refusal", 0.80, labels)
    assert good == []


def _history(losses, drift):
    return [{"loss": loss, "off_subspace": d} for loss, d in zip(losses, drift)]


def test_a_loss_still_falling_and_a_climbing_drift_are_flagged():
    steps = 50
    falling = [1.0 - 0.01 * i for i in range(steps)]
    climbing = [0.1 * i for i in range(steps)]
    figures, warnings = optimization_health(_history(falling, climbing))
    assert any("not converged" in w for w in warnings)
    assert any("L_U keeps climbing" in w for w in warnings)
    assert figures["off_subspace_last"] == climbing[-1]


def test_a_converged_run_with_flat_drift_is_healthy():
    steps = 50
    flat = [0.5 + 0.3 * 0.5 ** i for i in range(steps)]
    settled = [2.0 - 0.5 ** i for i in range(steps)]
    figures, warnings = optimization_health(_history(flat, settled))
    assert warnings == []
    assert abs(figures["loss_relative_change_last_window"]) < 0.02


def test_too_short_a_run_says_so():
    _, warnings = optimization_health(_history([1.0], [0.0]))
    assert warnings and "too few steps" in warnings[0]
