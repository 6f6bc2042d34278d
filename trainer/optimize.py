"""Optimize stage: the DRO objective and its AdamW loop over the soft prompt θ [N, hidden].

Loss (authors' `train.py:238-255`), per batch, measured relative to the human prompt's states h0:
    Δz  = Uᵀ(hθ − h0)                                  [B, k]  (the probe biases cancel)
    L_r = BCEwithLogits(Δz · w_r, y)   y = 1 harmless  (w_r points toward compliance)
    L_h = BCEwithLogits(Δz · w_h, y)
    L_U = mean_b ‖(I − UUᵀ)(hθ − h0)‖² / (hidden − k)   (drift off the PCA subspace)
    L   = α_r L_r + α_h L_h + α_U L_U                  (paper: 1, 0.01, 0.001; 0 disables a term)
    each sample's L is multiplied by its class weight: 1 for harmful, `harmless` (paper: 1) for harmless.
θ is placed exactly where vLLM splices a `prompt_embeds` system message (`trainer.chat`). The
loop is the authors': AdamW(lr, weight decay), clip_grad_norm(θ, 1.0) after backward, batches of
50 drawn by one `random.Random(seed)` that reshuffles the same index list every epoch. Batches may
be split into micro-batches whose gradients are accumulated (same gradient, less memory).

Knows nothing about files or labels' provenance.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from trainer.chat import build_spliced_batch, embed_spliced_batch
from trainer.model import FrozenChatModel, last_prompt_states


@dataclass(frozen=True)
class DroGeometry:
    """Frozen DRO geometry, float32: pca_components [H, k], refusal_weight [k], harmfulness_weight [k]."""

    pca_components: torch.Tensor
    refusal_weight: torch.Tensor
    harmfulness_weight: torch.Tensor


@dataclass(frozen=True)
class LossWeights:
    refusal: float = 1.0
    harmfulness: float = 0.01
    off_subspace: float = 0.001
    # Sample weight of harmless queries relative to harmful ones (1 = the paper's plain mean). Above 1
    # the optimiser trades part of the harmful queries' gain for fewer false refusals.
    harmless: float = 1.0


@dataclass(frozen=True)
class Schedule:
    lr: float = 1e-3
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    batch_size: int = 50
    micro_batch_size: int = 50
    epochs: int = 40
    seed: int = 42


def dro_loss_terms(h_theta: torch.Tensor, h_ref: torch.Tensor, harmless: torch.Tensor,
                   geometry: DroGeometry) -> dict[str, torch.Tensor]:
    """Per-sample loss terms. h_theta, h_ref [B, H] (any float), harmless [B] float in {0, 1}.

    Returns float32 tensors [B]: 'refusal', 'harmfulness' (BCE per sample), 'off_subspace'.
    """
    assert h_theta.shape == h_ref.shape and harmless.shape == (h_theta.shape[0],), (h_theta.shape, h_ref.shape)
    delta = h_theta.float() - h_ref.float()  # [B, H]; statistics in float32 on purpose
    coords = delta @ geometry.pca_components  # [B, k]
    residual = delta - coords @ geometry.pca_components.T  # [B, H]
    hidden, k = geometry.pca_components.shape
    y = harmless.float()
    return {
        "refusal": F.binary_cross_entropy_with_logits(coords @ geometry.refusal_weight, y, reduction="none"),
        "harmfulness": F.binary_cross_entropy_with_logits(coords @ geometry.harmfulness_weight, y, reduction="none"),
        "off_subspace": residual.pow(2).sum(dim=-1) / (hidden - k),
    }


def combine_loss(terms: dict[str, torch.Tensor], weights: LossWeights, harmless: torch.Tensor) -> torch.Tensor:
    """Weighted sum of per-sample terms, times each sample's class weight -> [B] (mean it for the batch
    loss). harmless [B] float in {0, 1}."""
    per_sample = (weights.refusal * terms["refusal"] + weights.harmfulness * terms["harmfulness"]
                  + weights.off_subspace * terms["off_subspace"])
    return per_sample * (1.0 + (weights.harmless - 1.0) * harmless.float())


def soft_prompt_states(frozen: FrozenChatModel, soft_prompt: torch.Tensor, queries: list[str]) -> torch.Tensor:
    """hθ(x) for a batch of queries -> [B, H] in the model dtype (differentiable in θ)."""
    batch = build_spliced_batch(frozen.tokenizer, frozen.sentinel_id, queries, soft_prompt.shape[0], frozen.pad_id)
    embeds = embed_spliced_batch(frozen.embedding(), batch, soft_prompt)
    return last_prompt_states(frozen.model, batch.attention_mask, batch.lengths, inputs_embeds=embeds)


@torch.no_grad()
def soft_prompt_states_batched(frozen: FrozenChatModel, soft_prompt: torch.Tensor, queries: list[str],
                               batch_size: int = 16) -> torch.Tensor:
    """hθ for many queries without gradients -> [Q, H] float32."""
    return torch.cat([soft_prompt_states(frozen, soft_prompt, queries[i:i + batch_size]).float().cpu()
                      for i in range(0, len(queries), batch_size)])


def shuffled_batches(n: int, batch_size: int, epochs: int, seed: int):
    """Yield (epoch, index list) like the authors' get_shuffled_messages_and_labels."""
    if n % batch_size != 0:
        raise ValueError(f"{n} training queries is not a multiple of the batch size {batch_size}")
    rng = random.Random(seed)
    indices = list(range(n))
    for epoch in range(epochs):
        rng.shuffle(indices)
        for start in range(0, n, batch_size):
            yield epoch, indices[start:start + batch_size]


def optimize_soft_prompt(frozen: FrozenChatModel, queries: list[str], harmless: torch.Tensor,
                         reference_states: torch.Tensor, init_soft_prompt: torch.Tensor,
                         geometry: DroGeometry, weights: LossWeights, schedule: Schedule,
                         show_progress: bool = True) -> tuple[torch.Tensor, list[dict[str, float]]]:
    """Train θ. queries (Q), harmless [Q] float, reference_states h0 [Q, H] float32,
    init_soft_prompt [N, H]. θ is kept in float32 (master copy) and cast to the model dtype in
    the forward. Returns (θ [N, H] float32, per-step history of the mean loss terms).
    """
    assert reference_states.shape == (len(queries), frozen.hidden_size), reference_states.shape
    assert init_soft_prompt.ndim == 2 and init_soft_prompt.shape[1] == frozen.hidden_size
    device = frozen.device
    geometry = DroGeometry(*(t.to(device) for t in (geometry.pca_components, geometry.refusal_weight,
                                                    geometry.harmfulness_weight)))
    reference_states, harmless = reference_states.to(device), harmless.to(device)
    theta = torch.nn.Parameter(init_soft_prompt.detach().float().clone().to(device))
    optimizer = torch.optim.AdamW([theta], lr=schedule.lr, weight_decay=schedule.weight_decay)
    total_steps = schedule.epochs * math.ceil(len(queries) / schedule.batch_size)
    history: list[dict[str, float]] = []
    started = time.monotonic()
    with tqdm(total=total_steps, desc="optimize", unit="step", disable=not show_progress) as bar:
        for epoch, batch in shuffled_batches(len(queries), schedule.batch_size, schedule.epochs, schedule.seed):
            optimizer.zero_grad()
            sums = {"refusal": 0.0, "harmfulness": 0.0, "off_subspace": 0.0, "loss": 0.0}
            for start in range(0, len(batch), schedule.micro_batch_size):
                part = batch[start:start + schedule.micro_batch_size]
                h_theta = soft_prompt_states(frozen, theta, [queries[i] for i in part])
                terms = dro_loss_terms(h_theta, reference_states[part], harmless[part], geometry)
                per_sample = combine_loss(terms, weights, harmless[part])
                # Sum of micro-batch sums / batch size == the full batch's mean: same gradient.
                (per_sample.sum() / len(batch)).backward()
                for name, value in terms.items():
                    sums[name] += float(value.detach().sum())
                sums["loss"] += float(per_sample.detach().sum())
            grad_norm = float(torch.nn.utils.clip_grad_norm_([theta], schedule.clip_norm))
            optimizer.step()
            record = {name: value / len(batch) for name, value in sums.items()}
            record.update(step=len(history) + 1, epoch=epoch, grad_norm=grad_norm,
                          elapsed_s=time.monotonic() - started)
            history.append(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", L_r=f"{record['refusal']:.4f}")
            bar.update(1)
    return theta.detach().cpu().clone(), history
