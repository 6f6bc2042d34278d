"""PCA against scikit-learn, the probe recipe's sign conventions and folds, the label-balance check."""

from __future__ import annotations

import random

import torch
from sklearn.decomposition import PCA

from trainer.balance import check_balance, measure_balance
from trainer.config import BalanceConfig
from trainer.fit import ProbeRecipe, fit_pca, fit_probes, fold_indices, init_linear, train_probe_folds


def test_pca_matches_sklearn_up_to_sign():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(120, 32, generator=generator) @ torch.randn(32, 32, generator=generator) + 3.0
    ours = fit_pca(x, 4)
    reference = PCA(4, random_state=42).fit(x.numpy())
    assert ours.components.shape == (32, 4) and ours.components.dtype == torch.float32
    torch.testing.assert_close(ours.mean, torch.from_numpy(reference.mean_).float(), atol=1e-4, rtol=0)
    ref_components = torch.from_numpy(reference.components_.T).float()
    for k in range(4):
        sign = torch.sign(ours.components[:, k] @ ref_components[:, k])
        torch.testing.assert_close(ours.components[:, k] * sign, ref_components[:, k], atol=1e-4, rtol=0)
    torch.testing.assert_close(ours.explained_variance_ratio,
                               torch.from_numpy(reference.explained_variance_ratio_).float(), atol=1e-5, rtol=0)
    # Centred, not scaled: coordinates are Uᵀ(h − μ) exactly.
    torch.testing.assert_close(ours.project(x), torch.from_numpy(reference.transform(x.numpy())).float() *
                               torch.sign((ours.components * ref_components).sum(0)), atol=1e-3, rtol=0)


def test_folds_follow_python_random_42_and_partition():
    folds = fold_indices(800, 10, 42)
    order = list(range(800))
    random.Random(42).shuffle(order)
    assert [h for _, h in folds][0] == order[:80] and folds[3][1] == order[240:320]
    assert sorted(i for _, h in folds for i in h) == list(range(800))
    assert all(set(t).isdisjoint(h) and len(t) + len(h) == 800 for t, h in folds)


def test_probe_signs_follow_the_paper():
    """Refusal label 1 = complied and harmfulness label 1 = harmless: w points toward 1, so −w_r
    points toward refusals."""
    generator = torch.Generator().manual_seed(1)
    coords = torch.randn(200, 4, generator=generator)
    complied = (coords[:, 0] > 0).float()  # compliance grows with coordinate 0
    harmless = (coords[:, 1] < 0).float()  # harmless queries sit at negative coordinate 1
    recipe = ProbeRecipe(lr=5e-2, num_folds=5, max_steps=400)
    refusal, harmfulness = fit_probes(coords, complied, harmless, recipe)
    assert refusal.weight.shape == (4,) and refusal.bias.shape == () and refusal.fold_weights.shape == (5, 4)
    assert refusal.weight[0] > 0 and harmfulness.weight[1] < 0
    refusal_direction = -refusal.weight
    refused, complied_mask = coords[complied < 0.5], coords[complied > 0.5]
    assert float((refused.mean(0) - complied_mask.mean(0)) @ refusal_direction) > 0
    torch.testing.assert_close(refusal.weight, refusal.fold_weights.mean(0))


def test_probe_recipe_stops_early_and_keeps_the_best_copy():
    generator = torch.Generator().manual_seed(2)
    coords = torch.randn(100, 4, generator=generator)
    labels = torch.rand(100, generator=generator)  # noise: held-out loss stops improving quickly
    refusal, _ = fit_probes(coords, labels, labels, ProbeRecipe(num_folds=5))
    assert all(step < 10000 for step in refusal.fold_steps)


def test_folds_trained_together_equal_folds_trained_alone():
    generator = torch.Generator().manual_seed(4)
    x, y = torch.randn(3, 40, 4, generator=generator), torch.rand(3, 40, generator=generator)
    hx, hy = torch.randn(3, 10, 4, generator=generator), torch.rand(3, 10, generator=generator)
    inits = [init_linear(4, generator) for _ in range(3)]
    w0, b0 = torch.cat([w for w, _ in inits]), torch.cat([b for _, b in inits])
    recipe = ProbeRecipe(lr=1e-2, max_steps=60)
    together = train_probe_folds(x, y, hx, hy, w0, b0, recipe)
    for f in range(3):
        alone = train_probe_folds(x[f:f + 1], y[f:f + 1], hx[f:f + 1], hy[f:f + 1], w0[f:f + 1], b0[f:f + 1], recipe)
        torch.testing.assert_close(together[0][f], alone[0][0], rtol=0, atol=1e-6)
        assert together[2][f] == alone[2][0]


def test_probe_fit_is_deterministic():
    coords = torch.randn(60, 4, generator=torch.Generator().manual_seed(3))
    labels = (coords[:, 2] > 0).float()
    recipe = ProbeRecipe(num_folds=3, max_steps=50)
    first = fit_probes(coords, labels, labels, recipe)[0]
    second = fit_probes(coords, labels, labels, recipe)[0]
    assert torch.equal(first.weight, second.weight) and torch.equal(first.bias, second.bias)


def test_balance_check_fails_when_the_model_never_refuses_and_passes_when_it_tracks_harm():
    harmless = torch.tensor([0.0] * 10 + [1.0] * 10)
    never = torch.ones(4, 20)
    reasons = check_balance(measure_balance(never, harmless, ["none", "default", "short", "mistral"]), BalanceConfig())
    assert len(reasons) == 2 and "refuses only 0.0%" in reasons[0]
    tracks = torch.ones(4, 20)
    tracks[:, :10] = 0.2  # harmful queries refused 80% of the time
    balance = measure_balance(tracks, harmless, ["none", "default", "short", "mistral"])
    assert abs(balance["harmful_refusal_rate"] - 0.8) < 1e-6 and balance["harmless_refusal_rate"] == 0.0
    assert check_balance(balance, BalanceConfig()) == []
    noise = torch.full((4, 20), 0.7)  # refused 30% everywhere: no relation to harm
    assert any("margin" in r for r in check_balance(measure_balance(noise, harmless, ["a", "b", "c", "d"]),
                                                     BalanceConfig()))


def test_converged_solver_reaches_the_regularised_optimum_and_beats_the_paper_recipe_on_small_coordinates():
    # Small PCA coordinates (as in small models): the paper's tiny-lr recipe stops near its random
    # init, the converged solver finds the logistic regression's optimum.
    generator = torch.Generator().manual_seed(3)
    coords = 0.05 * torch.randn(400, 4, generator=generator)
    complied = (torch.rand(400, generator=generator) < torch.sigmoid(60 * coords[:, 0] - 30 * coords[:, 2])).float()
    recipe = ProbeRecipe(num_folds=5, solver="converged", l2=0.01)
    converged, _ = fit_probes(coords, complied, complied, recipe)
    paper, _ = fit_probes(coords, complied, complied, ProbeRecipe(num_folds=5))
    accuracy = lambda probe: float(((probe.logits(coords) > 0) == (complied > 0.5)).float().mean())
    assert accuracy(converged) > accuracy(paper) + 0.05
    assert converged.weight[0] > 0 and converged.weight[2] < 0
    # Each fold sits at its optimum: the gradient of its regularised objective vanishes.
    folds = fold_indices(400, 5, 42)
    train = folds[0][0]
    w = converged.fold_weights[0].double().requires_grad_(True)
    b = converged.fold_biases[0].double().requires_grad_(True)
    x, y = coords[train].double(), complied[train].double()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + 0.5 * 0.01 * w.pow(2).sum()
    loss.backward()
    assert float(w.grad.abs().max()) < 1e-4 and float(b.grad.abs()) < 1e-4
