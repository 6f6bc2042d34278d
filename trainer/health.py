"""Training health: is the refusal direction real, did the optimisation converge, did it stay on the map?

Pure functions over the numbers the fit and optimize stages already produce; each returns a small
dict of figures plus human-readable warnings. The summary prints the warnings and the manifest
stores them, so a weak run is visible before anyone serves it. Thresholds are `HealthThresholds`
(defaults written once, here).

- Refusal direction: the probe's accuracy against the majority-class baseline (always guessing the
  more common label). A probe that does not beat it by `min_probe_margin` has found no direction;
  DRO would push the soft prompt along noise.
- Convergence: the relative change of the mean loss between the last two windows of
  `window_fraction` of the steps. Above `max_final_relative_change`, the loss was still moving.
- Drift: L_U (off-subspace drift) growing through the last window means the soft prompt moves the
  representation where the probes cannot see, which is how a prompt breaks answers silently.
Knows nothing about files or models.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class HealthThresholds:
    min_probe_margin: float = 0.05  # accuracy points over the majority baseline
    window_fraction: float = 0.2  # last 20% of the steps against the 20% before
    max_final_relative_change: float = 0.02
    max_off_subspace_growth: float = 0.05  # relative growth of L_U across the last window


def majority_baseline(labels: torch.Tensor) -> float:
    """Accuracy of always guessing the more common side of labels [n] in [0, 1] (> 0.5 = positive)."""
    positive = float((labels > 0.5).float().mean())
    return max(positive, 1.0 - positive)


def probe_health(name: str, accuracy: float, labels: torch.Tensor,
                 thresholds: HealthThresholds = HealthThresholds()) -> tuple[dict[str, float], list[str]]:
    baseline = majority_baseline(labels)
    figures = {f"{name}_accuracy": accuracy, f"{name}_majority_baseline": baseline,
               f"{name}_margin": accuracy - baseline}
    warnings = []
    if accuracy - baseline < thresholds.min_probe_margin:
        warnings.append(
            f"weak {name} direction: probe accuracy {accuracy:.3f} beats always guessing the majority class "
            f"({baseline:.3f}) by only {accuracy - baseline:+.3f} (< {thresholds.min_probe_margin}); "
            "more label samples, a model that refuses, or another judge")
    return figures, warnings


def _window_means(values: list[float], fraction: float) -> tuple[float, float] | None:
    width = max(1, int(len(values) * fraction))
    if len(values) < 2 * width:
        return None
    previous = values[-2 * width:-width]
    last = values[-width:]
    return sum(previous) / len(previous), sum(last) / len(last)


def optimization_health(history: list[dict[str, float]],
                        thresholds: HealthThresholds = HealthThresholds()) -> tuple[dict[str, float], list[str]]:
    """history: per-step dicts with 'loss' and 'off_subspace' (as optimize_soft_prompt records)."""
    figures: dict[str, float] = {}
    warnings: list[str] = []
    losses = [h["loss"] for h in history]
    drift = [h["off_subspace"] for h in history]
    windows = _window_means(losses, thresholds.window_fraction)
    if windows is None:
        warnings.append(f"too few steps ({len(history)}) to judge convergence")
    else:
        previous, last = windows
        change = (previous - last) / max(abs(previous), 1e-12)
        figures["loss_relative_change_last_window"] = change
        if abs(change) > thresholds.max_final_relative_change:
            warnings.append(f"loss not converged: it changed by {change:+.1%} over the last "
                            f"{thresholds.window_fraction:.0%} of the steps; train longer")
    drift_windows = _window_means(drift, thresholds.window_fraction)
    figures["off_subspace_first"], figures["off_subspace_last"] = drift[0], drift[-1]
    if drift_windows is not None:
        previous, last = drift_windows
        growth = (last - previous) / max(abs(previous), 1e-12)
        figures["off_subspace_growth_last_window"] = growth
        if growth > thresholds.max_off_subspace_growth:
            warnings.append(f"L_U keeps climbing ({drift[0]:.3g} -> {drift[-1]:.3g}, {growth:+.1%} over the last "
                            "window): the soft prompt moves the representation off the PCA subspace; raise "
                            "optimize.weight_off_subspace or stop earlier")
    return figures, warnings


def answer_health(before: list[dict], after: list[dict], harmless: list[bool],
                  min_length_ratio: float = 0.6) -> tuple[dict[str, float], list[str]]:
    """Answers under θ0 and θ (dicts with 'words' and 'finished', same queries in the same order).

    Figures: mean words and finished share per class, before and after. Warns when the trained
    prompt shortens harmless answers below `min_length_ratio` of their initial length: a prompt
    that buys refusals by making the model terse makes it useless.
    """
    figures: dict[str, float] = {}
    warnings: list[str] = []
    for label, keep in (("harmful", False), ("harmless", True)):
        rows = [i for i, flag in enumerate(harmless) if flag == keep]
        if not rows:
            continue
        for when, answers in (("init", before), ("trained", after)):
            figures[f"{label}_words_{when}"] = sum(answers[i]["words"] for i in rows) / len(rows)
            figures[f"{label}_finished_{when}"] = sum(answers[i]["finished"] for i in rows) / len(rows)
    initial = figures.get("harmless_words_init")
    trained = figures.get("harmless_words_trained")
    if initial and trained is not None and trained < min_length_ratio * initial:
        warnings.append(f"harmless answers got shorter: {initial:.0f} -> {trained:.0f} words on average under the "
                        "trained prompt; read them (optimize.json 'answers') before serving it")
    return figures, warnings
