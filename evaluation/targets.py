"""Where a variant's request goes and what it looks like: through the gateway, or straight to vLLM.

- `GatewayTarget`: the request carries only the user's query; the variant is chosen by the model
  id `MODEL@VARIANT`, and the gateway puts the safety prompt in. Variants are checked against the
  gateway's `/v1/models` (and `all` expands to every `MODEL@*` it lists).
- `DirectTarget`: the harness itself puts the safety prompt in, with the gateway's own splice
  (`safeprompt.embeds.safety_system_message`): a human prompt as the system text, a soft prompt loaded
  from an artifact directory on disk as one `prompt_embeds` part. `none` sends no system message.
This module knows nothing about sets, caching or metrics.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from safeprompt.artifact import load_artifact
from safeprompt.embeds import encode_payload, safety_system_message, wire_dtype
from safeprompt.prompts import HUMAN_PROMPTS, VARIANT_SEPARATOR

NO_PROMPT = "none"


class TargetError(ValueError):
    """A variant that the target cannot serve."""


class Target(Protocol):
    variants: tuple[str, ...]

    def build_body(self, variant: str, query: str, params: dict[str, Any]) -> dict[str, Any]: ...


def resolve_gateway_variants(model: str, requested: tuple[str, ...], served_ids: list[str]) -> tuple[str, ...]:
    """The variants to evaluate, checked against the gateway's model list; `all` = every MODEL@*."""
    prefix = f"{model}{VARIANT_SEPARATOR}"
    served = [model_id[len(prefix):] for model_id in served_ids if model_id.startswith(prefix)]
    if not served:
        raise TargetError(f"the gateway serves no variants of {model!r}; it lists: {', '.join(served_ids)}")
    if "all" in requested:
        return tuple(served)
    missing = [variant for variant in requested if variant not in served]
    if missing:
        raise TargetError(f"the gateway does not serve {', '.join(prefix + v for v in missing)}; "
                          f"it serves variants: {', '.join(served)}")
    return tuple(requested)


class GatewayTarget:
    def __init__(self, model: str, variants: tuple[str, ...]) -> None:
        self.model = model
        self.variants = variants

    def build_body(self, variant: str, query: str, params: dict[str, Any]) -> dict[str, Any]:
        return {"model": f"{self.model}{VARIANT_SEPARATOR}{variant}",
                "messages": [{"role": "user", "content": query}], **params}


class DirectTarget:
    def __init__(self, model: str, variants: tuple[str, ...], artifacts: dict[str, Path]) -> None:
        self.model = model
        self.variants = variants
        self._text: dict[str, str] = {}
        self._embeds: dict[str, str] = {}
        for variant in variants:
            if variant == NO_PROMPT:
                continue
            if variant in artifacts:
                # The artifact's own payload, encoded once here (as the gateway does at load time).
                artifact = load_artifact(artifacts[variant])
                self._embeds[variant] = encode_payload(artifact.payload(wire_dtype(artifact.manifest.dtype, None)))
            elif variant in HUMAN_PROMPTS:
                self._text[variant] = HUMAN_PROMPTS[variant]
            else:
                raise TargetError(f"variant {variant!r} is neither {NO_PROMPT!r}, a human prompt "
                                  f"({', '.join(HUMAN_PROMPTS)}) nor given with --artifact {variant}=PATH")
        unused = sorted(set(artifacts) - set(variants))
        if unused:
            raise TargetError(f"--artifact given for variants not evaluated: {', '.join(unused)}")

    def build_body(self, variant: str, query: str, params: dict[str, Any]) -> dict[str, Any]:
        messages: list[dict[str, Any]] = [{"role": "user", "content": query}]
        if variant in self._embeds:
            messages.insert(0, safety_system_message(encoded_embeds=self._embeds[variant]))
        elif variant in self._text:
            messages.insert(0, safety_system_message(text=self._text[variant]))
        elif variant != NO_PROMPT:
            raise TargetError(f"unknown variant {variant!r}")
        return {"model": self.model, "messages": messages, **params}
