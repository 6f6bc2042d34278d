"""The DRO geometry as values: the PCA basis, the two logistic probes, and the one projection into PCA space.

The fit stage produces them, the optimize stage's loss and the report read them, the export stage
copies them into the artifact. Each value saves itself to and loads itself from a flat dict of
named tensors, under the names the run directory (`directions.safetensors`) and the gateway
artifact (`safeprompt.artifact`) use:

  pca_mean [hidden], pca_components [hidden, k], refusal_weight [k], refusal_bias [],
  harmfulness_weight [k], harmfulness_bias []   (all float32)

Sign conventions (the paper's): refusal label 1 = complied, harmfulness label 1 = harmless; so
w_r points toward compliance and the refusal direction is −w_r.
Pure values over tensors; knows nothing about files, models or how they were fitted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def project(states: torch.Tensor, components: torch.Tensor, mean: torch.Tensor | None = None) -> torch.Tensor:
    """PCA coordinates: [..., hidden] -> [..., k] float32, z = Uᵀ(h − μ), or Uᵀh without `mean`.

    Without a mean it projects differences of states (hθ − h0), where μ cancels. components
    [hidden, k] float32, mean [hidden] float32. Statistics in float32 on purpose, whatever the
    model dtype of `states`.
    """
    assert states.shape[-1] == components.shape[0], (tuple(states.shape), tuple(components.shape))
    centred = states.float() if mean is None else states.float() - mean
    return centred @ components


@dataclass(frozen=True)
class Pca:
    """components [hidden, k] float32 (orthonormal columns); mean [hidden] float32, None when only
    differences are projected; explained_variance_ratio [k], known right after fitting only."""

    components: torch.Tensor
    mean: torch.Tensor | None = None
    explained_variance_ratio: torch.Tensor | None = None

    @property
    def num_components(self) -> int:
        return int(self.components.shape[1])

    def project(self, states: torch.Tensor) -> torch.Tensor:
        """[..., hidden] -> [..., k] coordinates z = Uᵀ(h − μ) (Uᵀh without a mean)."""
        return project(states, self.components, self.mean)

    def project_difference(self, delta: torch.Tensor) -> torch.Tensor:
        """[..., hidden] difference of two states -> [..., k] Uᵀ(hθ − h0): the mean cancels."""
        return project(delta, self.components)

    def to(self, device: torch.device | str) -> Pca:
        def move(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.to(device)

        return Pca(self.components.to(device), move(self.mean), move(self.explained_variance_ratio))

    def to_tensors(self) -> dict[str, torch.Tensor]:
        mean = {} if self.mean is None else {"pca_mean": self.mean}
        return {**mean, "pca_components": self.components}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> Pca:
        mean = tensors.get("pca_mean")
        return cls(components=tensors["pca_components"].float(), mean=None if mean is None else mean.float())


@dataclass(frozen=True)
class Probe:
    """A frozen logistic probe in PCA space: score (logit) = z · weight + bias. weight [k], bias [] float32."""

    weight: torch.Tensor
    bias: torch.Tensor

    def score(self, coords: torch.Tensor) -> torch.Tensor:
        """[..., k] coordinates -> [...] logits."""
        return coords @ self.weight + self.bias

    def score_change(self, coords_change: torch.Tensor) -> torch.Tensor:
        """[..., k] change of coordinates (Δz) -> [...] change of the logit: Δz · weight (the bias cancels)."""
        return coords_change @ self.weight

    def to(self, device: torch.device | str) -> Probe:
        return Probe(self.weight.to(device), self.bias.to(device))

    def to_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {f"{name}_weight": self.weight, f"{name}_bias": self.bias}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], name: str) -> Probe:
        return cls(weight=tensors[f"{name}_weight"].float(), bias=tensors[f"{name}_bias"].float())


@dataclass(frozen=True)
class DroGeometry:
    """What DRO's loss is measured in: the PCA basis, the refusal probe and the harmfulness probe."""

    pca: Pca
    refusal: Probe
    harmfulness: Probe

    def to(self, device: torch.device | str) -> DroGeometry:
        return DroGeometry(self.pca.to(device), self.refusal.to(device), self.harmfulness.to(device))

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The artifact's geometry tensors (see the module docstring)."""
        return {**self.pca.to_tensors(), **self.refusal.to_tensors("refusal"),
                **self.harmfulness.to_tensors("harmfulness")}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> DroGeometry:
        """Reads the six geometry tensors; other keys (per-fold probes, the soft prompt) are ignored."""
        return cls(Pca.from_tensors(tensors), Probe.from_tensors(tensors, "refusal"),
                   Probe.from_tensors(tensors, "harmfulness"))
