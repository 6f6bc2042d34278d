"""bench/probe_strength.py: cross-validated refusal probes and split-half label noise on a run's files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from bench import probe_strength


def write_run(run: Path, signal: float, seed: int = 0) -> None:
    """2 conditions x 60 queries, hidden 32; refusal of (condition, query) is decided by coordinate 0."""
    rng = np.random.default_rng(seed)
    states = rng.normal(size=(2, 60, 32)).astype(np.float32)
    refused = states[:, :, 0] > 0.3
    states[:, :, 0] *= signal  # signal 0: the states carry nothing about refusal
    records, soft = [], np.zeros((2, 60))
    for c in range(2):
        for q in range(60):
            refusals = [bool(refused[c, q])] * 4
            records.append({"condition": f"c{c}", "query_index": q, "samples": ["x"] * 4, "refusals": refusals})
            soft[c, q] = 1 - sum(refusals) / 4
    run.mkdir()
    save_file({"states": states}, str(run / "states.safetensors"))
    labels = {"soft_labels": soft.tolist(), "harmless": [q % 2 == 1 for q in range(60)], "records": records}
    (run / "labels.json").write_text(json.dumps(labels))


def test_a_real_direction_beats_the_baseline_and_none_does_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    write_run(tmp_path / "strong", signal=1.0)
    write_run(tmp_path / "none", signal=0.0)
    monkeypatch.setattr(
        sys, "argv", ["probe_strength.py", str(tmp_path / "strong"), str(tmp_path / "none"), "--components", "4,0"]
    )
    probe_strength.main()
    out = capsys.readouterr().out
    strong = [line for line in out.splitlines() if line.startswith("| strong ")][0].strip("|").split("|")
    none = [line for line in out.splitlines() if line.startswith("| none ")][0].strip("|").split("|")
    baseline, whole = float(strong[4]), float(strong[6])
    assert whole > baseline + 15  # the whole state holds the direction
    assert float(none[6]) < float(none[4]) + 5  # nothing to find: no better than guessing the majority
    assert strong[2].strip() == "4" and strong[-1].strip() == "1.00, 100%"  # identical halves: no label noise
