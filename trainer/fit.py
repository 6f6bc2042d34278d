"""Fit stage: PCA of the hidden states and the refusal / harmfulness logistic probes in PCA space.

Follows the authors' `estimate.py` exactly where it matters for DRO's loss scale:
- PCA with k components on all states, centred, not scaled (exact SVD in float64; sklearn's
  `PCA(4, random_state=42)` uses randomised SVD at the paper's size, which agrees to numerical
  precision on the subspace). Components are sign-normalised (largest-|entry| positive).
- each probe is `nn.Linear(k, 1)` with PyTorch's default init (drawn from one torch generator
  seeded 42, refusal folds first, then harmfulness folds, like the authors' global RNG), trained
  full batch with BCE-with-logits and AdamW(lr 1e-4, weight decay 0.01); one step per "epoch";
  early stopping on the held-out fold's BCE (improvement must exceed 1e-4; stop after 3 steps
  without one; keep the best copy); at most 10000 steps;
- 10 folds: indices shuffled by `random.Random(42)`, cut into consecutive folds; fold weights and
  biases are averaged.

`probe_solver="converged"` (a recorded deviation, for models whose PCA coordinates are small): the same
folds, but each fold's probe is fitted to convergence (full-batch L-BFGS on mean BCE plus
`l2`/2·‖w‖²) instead of tiny-lr AdamW with patience 3. With small coordinates the paper's recipe
stops after a handful of steps, so its weights stay near their random initialisation and the
"direction" is mostly the init; the converged fit is the logistic regression the recipe approximates.

Sign conventions (the paper's): refusal label 1 = complied (not refused); harmfulness label
1 = harmless. So w_r points toward compliance, and the refusal direction is -w_r.

`fit_directions` is the whole stage over the extracted states and soft labels: the paper's sample
order, PCA, projection (`trainer.geometry.project`), both probes, their training accuracies. The
recipe's settings are `FitConfig`'s fields (defaults written once, there).
Pure functions over tensors; knows nothing about models or files.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainer.config import FitConfig
from trainer.geometry import DroGeometry, Pca, Probe


def paper_order(tensor: torch.Tensor, harmless: torch.Tensor) -> torch.Tensor:
    """[C, Q, ...] -> [C*Q, ...] in estimate.py's order: harmful x conditions, then harmless x conditions."""
    groups = [torch.nonzero(harmless < 0.5).squeeze(-1), torch.nonzero(harmless >= 0.5).squeeze(-1)]
    return torch.cat([tensor[c, g] for g in groups for c in range(tensor.shape[0])])


def fit_pca(states: torch.Tensor, num_components: int = 4) -> Pca:
    """PCA of states [n, hidden] (centred, not scaled). Accumulates in float64 on purpose."""
    if states.ndim != 2 or states.shape[0] < num_components + 1:
        raise ValueError(f"PCA needs [n > {num_components}, hidden] states, got {tuple(states.shape)}")
    x = states.double()
    mean = x.mean(dim=0)
    _, singular, vh = torch.linalg.svd(x - mean, full_matrices=False)
    components = vh[:num_components]  # [k, hidden]
    # Deterministic sign: the largest-magnitude entry of each component is positive.
    signs = torch.sign(components.gather(1, components.abs().argmax(dim=1, keepdim=True)))
    components = components * signs
    variance = singular**2
    ratio = variance[:num_components] / variance.sum()
    return Pca(components=components.T.contiguous().float(), mean=mean.float(),
               explained_variance_ratio=ratio.float())


@dataclass(frozen=True)
class ProbeFit:
    """A fitted probe (the fold average) with its folds: fold_weights [folds, k], fold_biases [folds],
    each fold's best step and held-out BCE."""

    probe: Probe
    fold_weights: torch.Tensor
    fold_biases: torch.Tensor
    fold_steps: list[int]
    fold_heldout_bce: list[float]

    def to_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {**self.probe.to_tensors(name), f"{name}_fold_weights": self.fold_weights,
                f"{name}_fold_biases": self.fold_biases}


def fold_indices(n: int, num_folds: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """(train, held-out) index lists: shuffle with random.Random(seed), consecutive folds."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    size = n // num_folds
    if num_folds < 2 or size == 0:
        raise ValueError(f"cannot cut {n} samples into {num_folds} folds")
    return [(order[:i * size] + order[(i + 1) * size:], order[i * size:(i + 1) * size]) for i in range(num_folds)]


def init_linear(k: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """nn.Linear(k, 1)'s default init, drawn from `generator` (kaiming_uniform(a=√5) = U(±1/√k))."""
    bound = 1.0 / math.sqrt(k)
    weight = torch.empty(1, k).uniform_(-bound, bound, generator=generator)
    bias = torch.empty(1).uniform_(-bound, bound, generator=generator)
    return weight, bias


def train_probe_folds(train_x: torch.Tensor, train_y: torch.Tensor, heldout_x: torch.Tensor,
                      heldout_y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                      config: FitConfig) -> tuple[torch.Tensor, torch.Tensor, list[int], list[float]]:
    """The authors' `train_model`, for F independent folds at once.

    train_x [F, n, k], train_y [F, n], heldout_x [F, m, k], heldout_y [F, m] float32; initial
    weight [F, k], bias [F]. Summing the folds' mean BCEs gives each fold exactly its own gradient,
    and AdamW is elementwise, so this equals F separate runs; it only saves Python overhead. A fold
    stops after `patience` steps whose held-out BCE did not beat its best by `min_delta` (or at
    `max_steps`); its best copy is returned. Returns (weights [F, k], biases [F], best steps, best BCEs).
    """
    folds = weight.shape[0]
    weight = weight.clone().requires_grad_(True)
    bias = bias.clone().requires_grad_(True)
    optimizer = torch.optim.AdamW([weight, bias], lr=config.lr, weight_decay=config.weight_decay)
    best_w, best_b = weight.detach().clone(), bias.detach().clone()
    best_loss = torch.full((folds,), 1e5)
    best_step = torch.zeros(folds, dtype=torch.long)
    misses = torch.zeros(folds, dtype=torch.long)
    active = torch.ones(folds, dtype=torch.bool)
    step = 0
    while bool(active.any()):
        optimizer.zero_grad()
        logits = torch.einsum("fnk,fk->fn", train_x, weight) + bias[:, None]
        F.binary_cross_entropy_with_logits(logits, train_y, reduction="none").mean(dim=1).sum().backward()
        optimizer.step()
        step += 1
        with torch.no_grad():
            heldout_logits = torch.einsum("fmk,fk->fm", heldout_x, weight) + bias[:, None]
            heldout = F.binary_cross_entropy_with_logits(heldout_logits, heldout_y, reduction="none").mean(dim=1)
            improved = active & (heldout < best_loss - config.min_delta)
            best_loss = torch.where(improved, heldout, best_loss)
            best_w = torch.where(improved[:, None], weight.detach(), best_w)
            best_b = torch.where(improved, bias.detach(), best_b)
            best_step = torch.where(improved, step, best_step)
            misses = torch.where(improved, 0, misses + active.long())
            active = active & (misses < config.patience) & (step < config.max_steps)
    return best_w, best_b, best_step.tolist(), best_loss.tolist()


def train_probe_folds_converged(train_x: torch.Tensor, train_y: torch.Tensor, heldout_x: torch.Tensor,
                                heldout_y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                                config: FitConfig) -> tuple[torch.Tensor, torch.Tensor, list[int], list[float]]:
    """L2-regularised logistic regression per fold, fitted to convergence (same shapes as
    `train_probe_folds`). The folds' objectives are independent, so minimising their sum with one
    L-BFGS minimises each. Accumulates in float64 on purpose (a converged fit, not a few steps).
    """
    x, y = train_x.double(), train_y.double()
    weight = weight.double().clone().requires_grad_(True)
    bias = bias.double().clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=config.max_steps, tolerance_grad=1e-10,
                                  tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        logits = torch.einsum("fnk,fk->fn", x, weight) + bias[:, None]
        loss = (F.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(dim=1)
                + 0.5 * config.l2 * weight.pow(2).sum(dim=1)).sum()
        loss.backward()
        return loss

    optimizer.step(objective)
    steps = int(optimizer.state[optimizer._params[0]]["n_iter"])
    with torch.no_grad():
        heldout_logits = torch.einsum("fmk,fk->fm", heldout_x.double(), weight) + bias[:, None]
        heldout = F.binary_cross_entropy_with_logits(heldout_logits, heldout_y.double(), reduction="none").mean(dim=1)
    return (weight.detach().float(), bias.detach().float(), [steps] * weight.shape[0],
            heldout.float().tolist())


def fit_probe(coords: torch.Tensor, labels: torch.Tensor, config: FitConfig,
              generator: torch.Generator) -> ProbeFit:
    """Fold-averaged logistic probe. coords [n, k] float32, labels [n] float32 in [0, 1]."""
    assert coords.ndim == 2 and labels.shape == (coords.shape[0],), (coords.shape, labels.shape)
    coords, labels = coords.float(), labels.float()
    folds = fold_indices(coords.shape[0], config.num_folds, config.seed)
    inits = [init_linear(coords.shape[1], generator) for _ in folds]  # fold order = the authors' RNG order
    train = torch.tensor([t for t, _ in folds])
    heldout = torch.tensor([h for _, h in folds])
    weight0 = torch.cat([w for w, _ in inits])  # [F, k]
    bias0 = torch.cat([b for _, b in inits])  # [F]
    train_folds = train_probe_folds if config.probe_solver == "paper" else train_probe_folds_converged
    fold_w, fold_b, steps, losses = train_folds(coords[train], labels[train], coords[heldout],
                                                labels[heldout], weight0, bias0, config)
    return ProbeFit(probe=Probe(weight=fold_w.mean(0), bias=fold_b.mean(0)), fold_weights=fold_w,
                    fold_biases=fold_b, fold_steps=steps, fold_heldout_bce=losses)


def fit_probes(coords: torch.Tensor, refusal_labels: torch.Tensor, harmless_labels: torch.Tensor,
               config: FitConfig) -> tuple[ProbeFit, ProbeFit]:
    """Refusal probe (label 1 = complied) then harmfulness probe (label 1 = harmless), one RNG stream."""
    generator = torch.Generator().manual_seed(config.seed)
    refusal = fit_probe(coords, refusal_labels, config, generator)
    harmfulness = fit_probe(coords, harmless_labels, config, generator)
    return refusal, harmfulness


def probe_accuracy(probe: Probe, coords: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of samples whose predicted side (logit > 0) matches label > 0.5."""
    return float(((probe.score(coords) > 0) == (labels > 0.5)).float().mean())


@dataclass(frozen=True)
class Directions:
    """The fit stage's result: PCA, both probes with their folds, the labels they were fitted to
    (paper order, [C*Q] float32) and their training accuracies."""

    pca: Pca
    refusal: ProbeFit
    harmfulness: ProbeFit
    refusal_labels: torch.Tensor
    harmless_labels: torch.Tensor
    refusal_accuracy: float
    harmfulness_accuracy: float

    @property
    def geometry(self) -> DroGeometry:
        return DroGeometry(self.pca, self.refusal.probe, self.harmfulness.probe)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """directions.safetensors: the geometry plus each probe's per-fold weights and biases."""
        return {**self.pca.to_tensors(), **self.refusal.to_tensors("refusal"),
                **self.harmfulness.to_tensors("harmfulness")}


def fit_directions(states: torch.Tensor, soft_labels: torch.Tensor, harmless: torch.Tensor,
                   config: FitConfig) -> Directions:
    """The fit stage. states [C, Q, hidden] float32, soft_labels [C, Q] (1 = complied), harmless [Q]
    in {0, 1}; every (condition, query) state is one sample, in the authors' order."""
    assert states.dtype == torch.float32 and states.ndim == 3 and states.shape[:2] == soft_labels.shape, (
        states.dtype, tuple(states.shape), tuple(soft_labels.shape))
    x = paper_order(states, harmless)  # [C*Q, H]
    y_refusal = paper_order(soft_labels, harmless)  # [C*Q], 1 = complied
    y_harmless = paper_order(harmless.expand_as(soft_labels), harmless)  # [C*Q], 1 = harmless
    pca = fit_pca(x, config.num_components)
    coords = pca.project(x)  # [C*Q, k]
    refusal, harmfulness = fit_probes(coords, y_refusal, y_harmless, config)
    return Directions(pca=pca, refusal=refusal, harmfulness=harmfulness, refusal_labels=y_refusal,
                      harmless_labels=y_harmless,
                      refusal_accuracy=probe_accuracy(refusal.probe, coords, y_refusal),
                      harmfulness_accuracy=probe_accuracy(harmfulness.probe, coords, y_harmless))
