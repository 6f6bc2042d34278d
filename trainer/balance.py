"""Label balance: can these refusal labels support a refusal direction?

DRO fits the refusal direction to the model's own refusals. If the model (as judged) almost never
or almost always refuses, or refuses harmful queries no more often than harmless ones, the
"direction" is fitted to judge noise. `measure_balance` reports the numbers; `check_balance`
returns the reasons the labels fail the configured thresholds (empty when they pass).
Pure; knows nothing about files or models.
"""

from __future__ import annotations

import torch

from trainer.config import BalanceConfig


def measure_balance(labels: torch.Tensor, harmless: torch.Tensor, conditions: list[str]) -> dict:
    """labels [C, Q] soft compliance in [0, 1]; harmless [Q] in {0, 1} -> refusal rates (plain floats)."""
    assert labels.ndim == 2 and harmless.shape == (labels.shape[1],), (labels.shape, harmless.shape)
    refusal = 1.0 - labels.float()
    harmful_mask, harmless_mask = harmless < 0.5, harmless >= 0.5
    per_condition = {
        c: {"harmful_refusal_rate": float(refusal[i, harmful_mask].mean()),
            "harmless_refusal_rate": float(refusal[i, harmless_mask].mean()),
            "harmful_any_refusal": float((refusal[i, harmful_mask] > 0).float().mean())}
        for i, c in enumerate(conditions)
    }
    return {
        "refusal_rate": float(refusal.mean()),
        "harmful_refusal_rate": float(refusal[:, harmful_mask].mean()),
        "harmless_refusal_rate": float(refusal[:, harmless_mask].mean()),
        "share_of_states_with_any_refusal": float((refusal > 0).float().mean()),
        "per_condition": per_condition,
    }


def check_balance(balance: dict, config: BalanceConfig) -> list[str]:
    """Reasons the labels cannot support a direction under `config`; [] when they can."""
    reasons = []
    rate = balance["refusal_rate"]
    if rate < config.min_refusal_rate:
        reasons.append(f"the model refuses only {rate:.1%} of all (query, condition) samples "
                       f"(minimum {config.min_refusal_rate:.1%}): there are almost no refusals to fit a refusal direction to")
    if rate > config.max_refusal_rate:
        reasons.append(f"the model refuses {rate:.1%} of all samples (maximum {config.max_refusal_rate:.1%}): "
                       "there is almost no compliance to contrast refusals with")
    margin = balance["harmful_refusal_rate"] - balance["harmless_refusal_rate"]
    if margin < config.min_harmful_margin:
        reasons.append(f"harmful queries are refused {balance['harmful_refusal_rate']:.1%} and harmless ones "
                       f"{balance['harmless_refusal_rate']:.1%} (margin {margin:+.1%} < {config.min_harmful_margin:+.1%}): "
                       "refusals do not track harmfulness, so the labels look like judge noise "
                       "(also rule out a judge that misses this model's way of refusing)")
    return reasons
