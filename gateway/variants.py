"""Served models and their safety-prompt variants: building them from settings, resolving a
request's `model` field, and splitting traffic between variants.

Model ids: `NAME@VARIANT` addresses one variant (e.g. `smollm2-135m-instruct@dro`); the bare
`NAME` gets the configured default variant, or, when a split is configured, a variant drawn by
weight, deterministically per user (when the request names one) or per request id.
Artifacts are loaded and checked against the served model once, at startup.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Literal

from gateway.errors import ModelNotFound
from gateway.settings import ModelConfig
from safeprompt.artifact import (
    ArtifactError,
    Manifest,
    ModelInfo,
    check_artifact_fits,
    load_artifact,
    read_model_info,
)
from safeprompt.embeds import encode_payload, wire_dtype
from safeprompt.prompts import HUMAN_PROMPTS, VARIANT_SEPARATOR

logger = logging.getLogger("gateway.variants")

SEPARATOR = VARIANT_SEPARATOR


@dataclass(frozen=True)
class Variant:
    name: str
    kind: Literal["none", "text", "soft"]
    text: str | None = None
    encoded_embeds: str | None = None  # the artifact's payload, base64-encoded once at load time
    num_virtual_tokens: int = 0
    manifest: Manifest | None = None


@dataclass
class ServedModel:
    name: str
    upstream_name: str
    default_variant: str
    variants: dict[str, Variant]
    split: dict[str, float] = field(default_factory=dict)
    # Unmodelled request fields forwarded for this model beyond the protocol's default allow-list.
    allowed_extra_fields: frozenset[str] = frozenset()

    def model_ids(self) -> list[str]:
        return [self.name, *(f"{self.name}{SEPARATOR}{name}" for name in self.variants)]


def load_model(config: ModelConfig) -> ServedModel:
    """Build one served model: the human variants plus each artifact, validated against the model.

    Raises ArtifactError naming the mismatch, so the gateway refuses to start with a soft prompt
    that does not belong to the served model.
    """
    variants: dict[str, Variant] = {"none": Variant(name="none", kind="none")}
    for name, text in HUMAN_PROMPTS.items():
        variants[name] = Variant(name=name, kind="text", text=text)
    model_info = read_model_info(config.model_path, name=config.name) if config.model_path else None
    serving_dtype = serving_dtype_of(config, model_info)
    for name, path in config.artifacts.items():
        artifact = load_artifact(path)
        if model_info is not None:
            check_artifact_fits(artifact, model_info)
        else:
            logger.warning(
                "model %s has no model_path: artifact %s is not checked against the model", config.name, path
            )
        if artifact.manifest.forced:
            if name not in config.allow_forced_artifacts:
                raise ArtifactError(
                    f"artifact {name!r} ({path}) is marked forced: it was trained with --force past a failed "
                    "label-balance check, so its refusal direction rests on labels that cannot support one. "
                    f"Not served; to serve it anyway, list it in models[].allow_forced_artifacts "
                    f"(allow_forced_artifacts: [{name}])"
                )
            logger.warning("artifact %s is served although it is marked forced (allow_forced_artifacts)", path)
        variants[name] = Variant(
            name=name,
            kind="soft",
            encoded_embeds=encode_payload(artifact.payload(wire_dtype(artifact.manifest.dtype, serving_dtype))),
            num_virtual_tokens=artifact.manifest.num_virtual_tokens,
            manifest=artifact.manifest,
        )
    return ServedModel(
        name=config.name,
        upstream_name=config.upstream_name,
        default_variant=config.default_variant,
        variants=variants,
        split=dict(config.split),
        allowed_extra_fields=frozenset(config.allowed_extra_fields),
    )


def serving_dtype_of(config: ModelConfig, model_info: ModelInfo | None) -> str | None:
    """The dtype vLLM computes this model in, when the gateway knows it (see ModelConfig.embeds_dtype)."""
    if config.embeds_dtype != "auto":
        return config.embeds_dtype
    if model_info is not None and model_info.dtype in ("bfloat16", "float16"):
        return model_info.dtype
    return None


def split_choice(weights: dict[str, float], key: str) -> str:
    """Pick a variant by weight, deterministically for `key` (uniform hash into [0, 1))."""
    total = sum(weights.values())
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    point = int.from_bytes(digest[:8], "big") / 2**64 * total
    cumulative = 0.0
    for name, weight in weights.items():
        cumulative += weight
        if point < cumulative and weight > 0:
            return name
    return next(name for name, weight in reversed(weights.items()) if weight > 0)


def resolve_variant(
    models: dict[str, ServedModel], model_id: str, *, request_id: str, user: str | None
) -> tuple[ServedModel, Variant]:
    """Map a request's `model` to (served model, variant); ModelNotFound (404) otherwise."""
    name, _, variant_name = model_id.partition(SEPARATOR)
    model = models.get(name)
    if model is None:
        raise ModelNotFound(f"The model '{model_id}' does not exist", param="model")
    if variant_name:
        variant = model.variants.get(variant_name)
        if variant is None:
            raise ModelNotFound(
                f"The model '{model_id}' does not exist: '{name}' has variants {', '.join(model.variants)}",
                param="model",
            )
        return model, variant
    if model.split:
        key = f"user:{user}" if user else f"request:{request_id}"
        return model, model.variants[split_choice(model.split, f"{model.name}|{key}")]
    return model, model.variants[model.default_variant]
