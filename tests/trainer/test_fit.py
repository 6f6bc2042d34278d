"""PCA against scikit-learn, the probe recipe's sign conventions, folds, early stopping and best copy,
the geometry's save/load round trip, the label-balance check."""

from __future__ import annotations

import random

import pytest
import torch
from sklearn.decomposition import PCA
from torch.optim.optimizer import register_optimizer_step_post_hook

from trainer.balance import check_balance, measure_balance
from trainer.config import BalanceConfig, FitConfig
from trainer.fit import fit_directions, fit_pca, fit_probes, fold_indices, init_linear, paper_order, train_probe_folds
from trainer.geometry import DroGeometry, Pca, project


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
    recipe = FitConfig(lr=5e-2, num_folds=5, max_steps=400)
    refusal, harmfulness = fit_probes(coords, complied, harmless, recipe)
    assert refusal.probe.weight.shape == (4,) and refusal.probe.bias.shape == ()
    assert refusal.fold_weights.shape == (5, 4)
    assert refusal.probe.weight[0] > 0 and harmfulness.probe.weight[1] < 0
    refusal_direction = -refusal.probe.weight
    refused, complied_mask = coords[complied < 0.5], coords[complied > 0.5]
    assert float((refused.mean(0) - complied_mask.mean(0)) @ refusal_direction) > 0
    torch.testing.assert_close(refusal.probe.weight, refusal.fold_weights.mean(0))


def test_probe_recipe_stops_early_and_keeps_the_best_copy():
    generator = torch.Generator().manual_seed(2)
    coords = torch.randn(100, 4, generator=generator)
    labels = torch.rand(100, generator=generator)  # noise: held-out loss stops improving quickly
    refusal, _ = fit_probes(coords, labels, labels, FitConfig(num_folds=5))
    assert all(step < 10000 for step in refusal.fold_steps)


def test_paper_recipe_stops_when_the_heldout_loss_stalls_and_returns_the_best_not_the_last_weights():
    # A weak signal under much noise: the held-out BCE falls for a few dozen steps, then stalls.
    generator = torch.Generator().manual_seed(6)
    direction = torch.randn(4, generator=generator)
    x, hx = torch.randn(1, 40, 4, generator=generator), torch.randn(1, 40, 4, generator=generator)
    y = (x @ direction + 2 * torch.randn(1, 40, generator=generator) > 0).float()
    hy = (hx @ direction + 2 * torch.randn(1, 40, generator=generator) > 0).float()
    w0, b0 = init_linear(4, generator)
    config = FitConfig(lr=5e-2, max_steps=5000)
    steps_taken = []
    hook = register_optimizer_step_post_hook(lambda *_: steps_taken.append(1))
    try:
        best_w, best_b, best_steps, best_bce = train_probe_folds(x, y, hx, hy, w0, b0, config)
    finally:
        hook.remove()
    steps, best_step = len(steps_taken), best_steps[0]
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    # Early stopping: `patience` steps without improvement after the best one, far before max_steps.
    assert 1 < best_step and steps == best_step + config.patience < config.max_steps
    # Replay the same AdamW for as many steps, recording every step's weights and held-out BCE.
    w, b = w0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    optimizer = torch.optim.AdamW([w, b], lr=config.lr, weight_decay=config.weight_decay)
    trajectory = []
    for _ in range(steps):
        optimizer.zero_grad()
        logits = torch.einsum("fnk,fk->fn", x, w) + b[:, None]
        bce(logits, y, reduction="none").mean(dim=1).sum().backward()
        optimizer.step()
        with torch.no_grad():
            heldout = bce(torch.einsum("fmk,fk->fm", hx, w) + b[:, None], hy, reduction="none").mean(dim=1)
        trajectory.append((w.detach().clone(), b.detach().clone(), float(heldout)))
    losses = [loss for _, _, loss in trajectory]
    assert abs(best_bce[0] - losses[best_step - 1]) < 1e-6 and best_bce[0] == pytest.approx(min(losses), abs=1e-4)
    assert all(loss > best_bce[0] - config.min_delta for loss in losses[best_step:])  # the stall
    # The best copy is returned, and it is not the last one.
    torch.testing.assert_close(best_w, trajectory[best_step - 1][0], rtol=0, atol=1e-6)
    torch.testing.assert_close(best_b, trajectory[best_step - 1][1], rtol=0, atol=1e-6)
    assert float((best_w - trajectory[-1][0]).abs().max()) > 1e-3


def test_geometry_saves_and_loads_itself_under_the_run_and_artifact_names():
    generator = torch.Generator().manual_seed(6)
    states = torch.randn(3, 8, 16, generator=generator)  # [C, Q, H]
    harmless = torch.tensor([0.0] * 4 + [1.0] * 4)
    soft = torch.rand(3, 8, generator=generator)
    directions = fit_directions(states, soft, harmless, FitConfig(num_folds=2, max_steps=20))
    tensors = directions.to_tensors()
    assert set(tensors) == {"pca_mean", "pca_components", "refusal_weight", "refusal_bias", "harmfulness_weight",
                            "harmfulness_bias", "refusal_fold_weights", "refusal_fold_biases",
                            "harmfulness_fold_weights", "harmfulness_fold_biases"}
    assert tensors["pca_components"].shape == (16, 4) and tensors["refusal_fold_weights"].shape == (2, 4)
    loaded = DroGeometry.from_tensors(tensors)
    assert set(loaded.to_tensors()) == set(tensors) - {name for name in tensors if "fold" in name}
    for name, tensor in loaded.to_tensors().items():
        assert torch.equal(tensor, tensors[name]) and tensor.dtype == torch.float32
    # One projection: centred for states, uncentred for differences of states (the mean cancels).
    x = paper_order(states, harmless)
    torch.testing.assert_close(loaded.pca.project(x), (x - tensors["pca_mean"]) @ tensors["pca_components"])
    torch.testing.assert_close(loaded.pca.project_difference(x[1:] - x[:-1]),
                               loaded.pca.project(x[1:]) - loaded.pca.project(x[:-1]), rtol=0, atol=1e-5)
    assert torch.equal(Pca(tensors["pca_components"]).project(x), project(x, tensors["pca_components"]))
    accuracy = float(((loaded.refusal.score(loaded.pca.project(x)) > 0) == (paper_order(soft, harmless) > 0.5))
                     .float().mean())
    assert accuracy == directions.refusal_accuracy


def test_folds_trained_together_equal_folds_trained_alone():
    generator = torch.Generator().manual_seed(4)
    x, y = torch.randn(3, 40, 4, generator=generator), torch.rand(3, 40, generator=generator)
    hx, hy = torch.randn(3, 10, 4, generator=generator), torch.rand(3, 10, generator=generator)
    inits = [init_linear(4, generator) for _ in range(3)]
    w0, b0 = torch.cat([w for w, _ in inits]), torch.cat([b for _, b in inits])
    recipe = FitConfig(lr=1e-2, max_steps=60)
    together = train_probe_folds(x, y, hx, hy, w0, b0, recipe)
    for f in range(3):
        alone = train_probe_folds(x[f:f + 1], y[f:f + 1], hx[f:f + 1], hy[f:f + 1], w0[f:f + 1], b0[f:f + 1], recipe)
        torch.testing.assert_close(together[0][f], alone[0][0], rtol=0, atol=1e-6)
        assert together[2][f] == alone[2][0]


def test_probe_fit_is_deterministic():
    coords = torch.randn(60, 4, generator=torch.Generator().manual_seed(3))
    labels = (coords[:, 2] > 0).float()
    recipe = FitConfig(num_folds=3, max_steps=50)
    first = fit_probes(coords, labels, labels, recipe)[0]
    second = fit_probes(coords, labels, labels, recipe)[0]
    assert torch.equal(first.probe.weight, second.probe.weight) and torch.equal(first.probe.bias, second.probe.bias)


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
    recipe = FitConfig(num_folds=5, probe_solver="converged", l2=0.01)
    converged, _ = fit_probes(coords, complied, complied, recipe)
    paper, _ = fit_probes(coords, complied, complied, FitConfig(num_folds=5))
    accuracy = lambda fit: float(((fit.probe.score(coords) > 0) == (complied > 0.5)).float().mean())
    assert accuracy(converged) > accuracy(paper) + 0.05
    assert converged.probe.weight[0] > 0 and converged.probe.weight[2] < 0
    # Each fold sits at its optimum: the gradient of its regularised objective vanishes.
    folds = fold_indices(400, 5, 42)
    train = folds[0][0]
    w = converged.fold_weights[0].double().requires_grad_(True)
    b = converged.fold_biases[0].double().requires_grad_(True)
    x, y = coords[train].double(), complied[train].double()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + 0.5 * 0.01 * w.pow(2).sum()
    loss.backward()
    assert float(w.grad.abs().max()) < 1e-4 and float(b.grad.abs()) < 1e-4
