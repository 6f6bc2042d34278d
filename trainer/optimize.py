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

The weights and the schedule are `OptimizeConfig`'s fields (defaults written once, there).
`initial_soft_prompt` finds θ0 (the init prompt's in-context token rows); `score_shift` measures
what θ did to the refusal probe's score. Knows nothing about files or labels' provenance.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from trainer.chat import build_spliced_batch, embed_spliced_batch, find_prompt_span
from trainer.config import InitPrompt, OptimizeConfig
from trainer.extract import system_text
from trainer.geometry import DroGeometry
from trainer.model import FrozenChatModel, last_prompt_states


@dataclass(frozen=True)
class LossTerms:
    """DRO's loss terms per sample, float32 [B] each: the refusal and harmfulness BCEs and the drift
    off the PCA subspace. Their field names are the loss history's keys."""

    refusal: torch.Tensor
    harmfulness: torch.Tensor
    off_subspace: torch.Tensor

    def sums(self) -> dict[str, float]:
        """Each term summed over its samples (no gradient), by name."""
        return {field.name: float(getattr(self, field.name).detach().sum()) for field in fields(self)}


def dro_loss_terms(h_theta: torch.Tensor, h_ref: torch.Tensor, harmless: torch.Tensor,
                   geometry: DroGeometry) -> LossTerms:
    """Per-sample loss terms. h_theta, h_ref [B, H] (any float), harmless [B] float in {0, 1}."""
    assert h_theta.shape == h_ref.shape and harmless.shape == (h_theta.shape[0],), (h_theta.shape, h_ref.shape)
    delta = h_theta.float() - h_ref.float()  # [B, H]; statistics in float32 on purpose
    coords = geometry.pca.project_difference(delta)  # [B, k]
    residual = delta - coords @ geometry.pca.components.T  # [B, H]
    hidden, k = geometry.pca.components.shape
    y = harmless.float()
    return LossTerms(
        refusal=F.binary_cross_entropy_with_logits(geometry.refusal.score_change(coords), y, reduction="none"),
        harmfulness=F.binary_cross_entropy_with_logits(geometry.harmfulness.score_change(coords), y,
                                                       reduction="none"),
        off_subspace=residual.pow(2).sum(dim=-1) / (hidden - k),
    )


def combine_loss(terms: LossTerms, config: OptimizeConfig, harmless: torch.Tensor) -> torch.Tensor:
    """Weighted sum of per-sample terms, times each sample's class weight -> [B] (mean it for the batch
    loss). harmless [B] float in {0, 1}; the weights are `config.weight_*`."""
    per_sample = (config.weight_refusal * terms.refusal + config.weight_harmfulness * terms.harmfulness
                  + config.weight_off_subspace * terms.off_subspace)
    return per_sample * (1.0 + (config.weight_harmless - 1.0) * harmless.float())


def soft_prompt_states(frozen: FrozenChatModel, soft_prompt: torch.Tensor, queries: list[str]) -> torch.Tensor:
    """hθ(x) for a batch of queries -> [B, H] in the model dtype (differentiable in θ)."""
    batch = build_spliced_batch(frozen.tokenizer, frozen.sentinel_id, queries, soft_prompt.shape[0], frozen.pad_id)
    embeds = embed_spliced_batch(frozen.embedding(), batch, soft_prompt)
    return last_prompt_states(frozen.model, batch.attention_mask, batch.lengths, inputs_embeds=embeds)


@torch.no_grad()
def soft_prompt_states_batched(frozen: FrozenChatModel, soft_prompt: torch.Tensor, queries: list[str],
                               batch_size: int = 64) -> torch.Tensor:
    """hθ for many queries without gradients -> [Q, H] float32."""
    return torch.cat([soft_prompt_states(frozen, soft_prompt, queries[i:i + batch_size]).float().cpu()
                      for i in range(0, len(queries), batch_size)])


def check_batch_size(n: int, batch_size: int) -> None:
    """The authors' batches are equal: `batch_size` must divide the number of training queries."""
    if n % batch_size != 0:
        fits = max(d for d in range(1, min(batch_size, n) + 1) if n % d == 0)
        raise ValueError(f"{n} training queries is not a multiple of optimize.batch_size {batch_size}; set "
                         f"optimize.batch_size to a divisor of {n} (the largest below {batch_size} is {fits}) "
                         "or change data.limit")


def shuffled_batches(n: int, batch_size: int, epochs: int, seed: int):
    """Yield (epoch, index list) like the authors' get_shuffled_messages_and_labels."""
    check_batch_size(n, batch_size)
    rng = random.Random(seed)
    indices = list(range(n))
    for epoch in range(epochs):
        rng.shuffle(indices)
        for start in range(0, n, batch_size):
            yield epoch, indices[start:start + batch_size]


def accumulate_gradient(frozen: FrozenChatModel, theta: torch.Tensor, queries: list[str],
                        reference_states: torch.Tensor, harmless: torch.Tensor, geometry: DroGeometry,
                        config: OptimizeConfig) -> dict[str, float]:
    """Add the gradient of one batch's mean loss to `theta.grad`, micro-batch by micro-batch
    (`config.micro_batch_size`: the same gradient as one pass, less memory).

    theta [N, H] float32 requiring grad; queries (B); reference_states h0 [B, H] float32 and harmless
    [B] on the model's device; geometry on that device. Returns the batch's mean loss terms and 'loss'.
    """
    sums: dict[str, float] = {}
    for start in range(0, len(queries), config.micro_batch_size):
        part = slice(start, start + config.micro_batch_size)
        h_theta = soft_prompt_states(frozen, theta, queries[part])
        terms = dro_loss_terms(h_theta, reference_states[part], harmless[part], geometry)
        per_sample = combine_loss(terms, config, harmless[part])
        # Sum of micro-batch sums / batch size == the full batch's mean: same gradient.
        (per_sample.sum() / len(queries)).backward()
        for name, value in {**terms.sums(), "loss": float(per_sample.detach().sum())}.items():
            sums[name] = sums.get(name, 0.0) + value
    return {name: value / len(queries) for name, value in sums.items()}


def optimize_soft_prompt(frozen: FrozenChatModel, queries: list[str], harmless: torch.Tensor,
                         reference_states: torch.Tensor, init_soft_prompt: torch.Tensor,
                         geometry: DroGeometry, config: OptimizeConfig,
                         show_progress: bool = True) -> tuple[torch.Tensor, list[dict[str, float]]]:
    """Train θ. queries (Q), harmless [Q] float, reference_states h0 [Q, H] float32,
    init_soft_prompt [N, H]. θ is kept in float32 (master copy) and cast to the model dtype in
    the forward (`config.dtype` is the model's; it is applied when the model is loaded). Returns
    (θ [N, H] float32, per-step history: the mean loss terms and 'loss', step, epoch, grad_norm, elapsed_s).
    """
    assert reference_states.shape == (len(queries), frozen.hidden_size), reference_states.shape
    assert init_soft_prompt.ndim == 2 and init_soft_prompt.shape[1] == frozen.hidden_size
    device = frozen.device
    geometry = geometry.to(device)
    reference_states, harmless = reference_states.to(device), harmless.to(device)
    theta = torch.nn.Parameter(init_soft_prompt.detach().float().clone().to(device))
    optimizer = torch.optim.AdamW([theta], lr=config.lr, weight_decay=config.weight_decay)
    total_steps = config.epochs * math.ceil(len(queries) / config.batch_size)
    history: list[dict[str, float]] = []
    started = time.monotonic()
    with tqdm(total=total_steps, desc="optimize", unit="step", disable=not show_progress) as bar:
        for epoch, batch in shuffled_batches(len(queries), config.batch_size, config.epochs, config.seed):
            optimizer.zero_grad()
            record = accumulate_gradient(frozen, theta, [queries[i] for i in batch], reference_states[batch],
                                         harmless[batch], geometry, config)
            grad_norm = float(torch.nn.utils.clip_grad_norm_([theta], config.clip_norm))
            optimizer.step()
            record.update(step=len(history) + 1, epoch=epoch, grad_norm=grad_norm,
                          elapsed_s=time.monotonic() - started)
            history.append(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", L_r=f"{record['refusal']:.4f}")
            bar.update(1)
    return theta.detach().cpu().clone(), history


@dataclass(frozen=True)
class InitialSoftPrompt:
    """θ0: the init prompt's condition ('none' for `template_default`), its system text (None for
    'none'), its token ids as tokenised in context, and their embedding rows [N, H] float32 on the CPU."""

    condition: str
    system: str | None
    token_ids: list[int]
    embeddings: torch.Tensor


def initial_soft_prompt(frozen: FrozenChatModel, init_prompt: InitPrompt, queries: list[str]) -> InitialSoftPrompt:
    """θ0 from a human prompt, or (`template_default`) from the system prompt the model's template inserts
    by itself (condition `none`). The span is checked to tokenise the same next to the first 8 queries."""
    condition = "none" if init_prompt == "template_default" else init_prompt
    system = system_text(condition)
    spans = {tuple(find_prompt_span(frozen.tokenizer, frozen.sentinel_id, system, q)) for q in queries[:8]}
    if len(spans) != 1:
        raise ValueError(f"the {init_prompt!r} prompt tokenises differently next to different queries")
    span = list(spans.pop())
    embeddings = frozen.embedding().weight[span].detach().float().cpu().clone()  # [N, H]
    return InitialSoftPrompt(condition, system, span, embeddings)


def score_shift(trained: torch.Tensor, reference: torch.Tensor, harmless: torch.Tensor,
                geometry: DroGeometry) -> dict[str, float]:
    """Mean change of the refusal score (−w_r·Δz: up = toward refusal) and of the compliance
    probability, for harmful and harmless training queries, from h0 to hθ. trained, reference [Q, H]
    float32, harmless [Q] in {0, 1}; the PCA needs its mean (the probability is read at the states)."""
    refusal_score = -geometry.refusal.score_change(geometry.pca.project_difference(trained - reference))
    change = (torch.sigmoid(geometry.refusal.score(geometry.pca.project(trained)))
              - torch.sigmoid(geometry.refusal.score(geometry.pca.project(reference))))
    harmful_mask, harmless_mask = harmless < 0.5, harmless >= 0.5
    return {"harmful_refusal_score_change": float(refusal_score[harmful_mask].mean()),
            "harmless_refusal_score_change": float(refusal_score[harmless_mask].mean()),
            "harmful_compliance_probability_change": float(change[harmful_mask].mean()),
            "harmless_compliance_probability_change": float(change[harmless_mask].mean())}
