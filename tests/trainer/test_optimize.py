"""The DRO objective at step 0, its descent, the probe shift it buys, determinism, micro-batching."""

from __future__ import annotations

import math

import pytest
import torch

from safeprompt.prompts import HUMAN_PROMPTS
from trainer.chat import find_prompt_span
from trainer.config import FitConfig, OptimizeConfig
from trainer.extract import extract_states
from trainer.fit import fit_pca, fit_probes, paper_order
from trainer.geometry import DroGeometry, Pca, Probe
from trainer.optimize import (accumulate_gradient, combine_loss, dro_loss_terms, optimize_soft_prompt,
                              score_shift, soft_prompt_states)

PROMPT = "short"


@pytest.fixture(scope="module")
def setup(frozen, queries):
    """Geometry fitted on the tiny model's states (4 conditions), reference states, θ0."""
    qs, harmless = queries
    states = extract_states(frozen, ["none", "default", "short", "mistral"], qs, batch_size=8, show_progress=False)
    x = paper_order(states, harmless)
    pca = fit_pca(x, 4)
    coords = pca.project(x)
    # Synthetic refusal labels that track harmfulness (the tiny random model does not refuse).
    y_refusal = paper_order(harmless.expand(4, -1) * 0.8 + 0.1, harmless)
    refusal, harmfulness = fit_probes(coords, y_refusal, paper_order(harmless.expand(4, -1), harmless),
                                      FitConfig(lr=5e-2, num_folds=4, max_steps=300))
    geometry = DroGeometry(pca, refusal.probe, harmfulness.probe)
    reference = states[2]  # the `short` condition = h(x, P)
    span = find_prompt_span(frozen.tokenizer, frozen.sentinel_id, HUMAN_PROMPTS[PROMPT], qs[0])
    theta0 = frozen.embedding().weight[span].detach().clone()
    return geometry, reference, theta0


def test_step_zero_losses_are_ln2_and_zero_when_theta_is_the_human_prompt(frozen, queries, setup):
    qs, harmless = queries
    geometry, reference, theta0 = setup
    with torch.no_grad():
        terms = dro_loss_terms(soft_prompt_states(frozen, theta0, qs), reference, harmless, geometry)
    assert terms.refusal.shape == (len(qs),) and terms.refusal.dtype == torch.float32
    assert abs(float(terms.refusal.mean()) - math.log(2)) < 1e-4
    assert abs(float(terms.harmfulness.mean()) - math.log(2)) < 1e-4
    assert float(terms.off_subspace.mean()) < 1e-8


def run(frozen, queries, setup, **schedule):
    qs, harmless = queries
    geometry, reference, theta0 = setup
    settings = dict(lr=2e-2, batch_size=8, micro_batch_size=8, epochs=6, seed=42) | schedule
    return optimize_soft_prompt(frozen, qs, harmless, reference, theta0, geometry, OptimizeConfig(**settings),
                                show_progress=False)


@pytest.fixture(scope="module")
def trained(frozen, queries, setup):
    return run(frozen, queries, setup)


def test_loss_falls_and_the_refusal_score_moves_the_right_way(frozen, queries, setup, trained):
    qs, harmless = queries
    geometry, reference, theta0 = setup
    theta, history = trained
    assert theta.shape == theta0.shape and theta.dtype == torch.float32
    assert len(history) == 6 and history[-1]["loss"] < history[0]["loss"] - 0.01
    with torch.no_grad():
        delta = soft_prompt_states(frozen, theta, qs) - reference
    refusal_score = -(delta @ geometry.pca.components @ geometry.refusal.weight)  # up = toward refusal
    assert float(refusal_score[harmless < 0.5].mean()) > 0  # harmful: more refusal
    assert float(refusal_score[harmless > 0.5].mean()) < 0  # harmless: less refusal


def test_training_is_deterministic_under_a_fixed_seed(frozen, queries, setup, trained):
    again, history = run(frozen, queries, setup)
    assert torch.equal(again, trained[0])
    assert [h["loss"] for h in history] == [h["loss"] for h in trained[1]]


def test_micro_batches_give_the_same_update(frozen, queries, setup, trained):
    split, _ = run(frozen, queries, setup, micro_batch_size=3, epochs=1)
    whole, _ = run(frozen, queries, setup, epochs=1)
    torch.testing.assert_close(split, whole, rtol=0, atol=1e-5)


def test_micro_batches_accumulate_the_gradient_of_the_batch_mean(frozen, queries, setup):
    # One AdamW step is about lr·sign(g) and blind to the gradient's scale: compare the gradients.
    qs, harmless = queries
    geometry, reference, theta0 = setup
    theta = theta0.float() + 0.01 * torch.randn(theta0.shape, generator=torch.Generator().manual_seed(7))
    config = OptimizeConfig(weight_off_subspace=0.1)

    def gradient(micro_batch_size: int) -> tuple[torch.Tensor, dict[str, float]]:
        parameter = theta.clone().requires_grad_(True)
        record = accumulate_gradient(frozen, parameter, qs, reference, harmless, geometry,
                                     config.model_copy(update={"micro_batch_size": micro_batch_size}))
        return parameter.grad, record

    parameter = theta.clone().requires_grad_(True)
    terms = dro_loss_terms(soft_prompt_states(frozen, parameter, qs), reference, harmless, geometry)
    loss = combine_loss(terms, config, harmless).mean()
    (expected,) = torch.autograd.grad(loss, parameter)
    assert float(expected.norm()) > 1e-4
    for micro_batch_size in (3, 8):
        grad, record = gradient(micro_batch_size)
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-7)
        assert record["loss"] == pytest.approx(float(loss.detach()), rel=1e-5)
        assert record["refusal"] == pytest.approx(float(terms.refusal.detach().mean()), rel=1e-5)


def test_score_shift_reads_the_refusal_probe_between_reference_and_trained_states():
    torch.manual_seed(1)
    hidden, k = 10, 3
    pca = Pca(torch.linalg.qr(torch.randn(hidden, k))[0], mean=torch.randn(hidden))
    refusal = Probe(torch.randn(k), torch.tensor(0.3))
    geometry = DroGeometry(pca, refusal, Probe(torch.randn(k), torch.tensor(0.0)))
    reference, harmless = torch.randn(4, hidden), torch.tensor([0.0, 0.0, 1.0, 1.0])
    trained = reference - 0.5 * (pca.components @ refusal.weight)  # toward refusal
    shift = score_shift(trained, reference, harmless, geometry)
    expected = 0.5 * float(refusal.weight @ refusal.weight)
    assert shift["harmful_refusal_score_change"] == pytest.approx(expected, rel=1e-5)
    assert shift["harmless_refusal_score_change"] == pytest.approx(expected, rel=1e-5)
    assert shift["harmful_compliance_probability_change"] < 0


def test_zero_weight_disables_a_term(frozen, queries, setup):
    qs, harmless = queries
    geometry, reference, theta0 = setup
    config = OptimizeConfig(weight_refusal=0.0, weight_harmfulness=0.0, weight_off_subspace=1.0, lr=1e-2,
                            batch_size=8, micro_batch_size=8, epochs=2)
    # Probes pointing the other way: with their weights 0 they must not change a single bit of the run.
    flipped = DroGeometry(geometry.pca, Probe(-geometry.refusal.weight, geometry.refusal.bias + 1),
                          Probe(-geometry.harmfulness.weight, geometry.harmfulness.bias - 1))
    runs = [optimize_soft_prompt(frozen, qs, harmless, reference, theta0, g, config, show_progress=False)
            for g in (geometry, flipped)]
    (theta_a, history_a), (theta_b, history_b) = runs
    assert torch.equal(theta_a, theta_b)
    assert [h["loss"] for h in history_a] == [h["loss"] for h in history_b]
    assert [h["refusal"] for h in history_a] != [h["refusal"] for h in history_b]  # the terms differ, unweighted
    # Only L_U is left, which is 0 at θ0 up to float rounding (the batch is packed in another order).
    assert history_a[0]["loss"] < 1e-8
    assert history_a[0]["loss"] == history_a[0]["off_subspace"]


def test_harmless_weight_scales_only_the_harmless_samples_gradients():
    torch.manual_seed(0)
    hidden, k = 12, 3
    geometry = DroGeometry(Pca(torch.linalg.qr(torch.randn(hidden, k))[0]), Probe(torch.randn(k), torch.zeros(())),
                           Probe(torch.randn(k), torch.zeros(())))
    h_ref, harmless = torch.randn(4, hidden), torch.tensor([0.0, 1.0, 0.0, 1.0])

    def gradient(harmless_weight: float) -> torch.Tensor:
        h_theta = (h_ref + torch.randn(4, hidden, generator=torch.Generator().manual_seed(1))).requires_grad_()
        terms = dro_loss_terms(h_theta, h_ref, harmless, geometry)
        weights = OptimizeConfig(weight_refusal=1.0, weight_harmfulness=0.01, weight_off_subspace=0.1,
                                 weight_harmless=harmless_weight)
        combine_loss(terms, weights, harmless).sum().backward()
        return h_theta.grad

    plain, weighted = gradient(1.0), gradient(2.0)
    torch.testing.assert_close(weighted[harmless == 0], plain[harmless == 0])
    torch.testing.assert_close(weighted[harmless == 1], 2 * plain[harmless == 1])
    assert float(plain[harmless == 1].abs().sum()) > 0


def test_bf16_forward_keeps_step_zero_exact_and_theta_float32(tiny_model_dir, queries, setup):
    # Train in the dtype vLLM serves in: the model in bf16, θ a float32 master copy cast where it
    # is spliced. With h0 computed in the same dtype, step 0 is still the text prompt exactly.
    from trainer.extract import extract_condition_states
    from trainer.model import load_frozen_model

    qs, harmless = queries
    geometry, _, _ = setup
    frozen_bf16 = load_frozen_model(tiny_model_dir, "bfloat16")
    assert frozen_bf16.embedding().weight.dtype == torch.bfloat16
    span = find_prompt_span(frozen_bf16.tokenizer, frozen_bf16.sentinel_id, HUMAN_PROMPTS[PROMPT], qs[0])
    theta0 = frozen_bf16.embedding().weight[span].detach().float()
    reference = extract_condition_states(frozen_bf16, HUMAN_PROMPTS[PROMPT], qs, batch_size=8)
    with torch.no_grad():
        terms = dro_loss_terms(soft_prompt_states(frozen_bf16, theta0, qs), reference, harmless, geometry)
    assert abs(float(terms.refusal.mean()) - math.log(2)) < 1e-6
    assert float(terms.off_subspace.mean()) == 0.0
    theta, history = optimize_soft_prompt(frozen_bf16, qs, harmless, reference, theta0, geometry,
                                          OptimizeConfig(lr=2e-2, batch_size=8, micro_batch_size=4, epochs=3),
                                          show_progress=False)
    assert theta.dtype == torch.float32 and not torch.equal(theta, theta0)
    assert history[-1]["refusal"] < history[0]["refusal"]
