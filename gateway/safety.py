"""Put a safety prompt into a chat request: the one place that decides what vLLM sees.

- A text variant becomes the system message's text.
- A soft prompt becomes the system message whose content is exactly one `prompt_embeds` part; vLLM
  renders the model's chat template around it and expands its sentinel into the N rows, the same
  positions the trainer optimised (see docs/architecture.md). The payload is serialised once, when
  the artifact is loaded (`safeprompt.embeds.encode_prompt_embeds`), never per request.
- A client's own system message is handled by the configured policy (see `apply_safety_prompt`).
- `build_upstream_body` is the whole request vLLM receives, built from the parsed request.

Client input that could inject tensors or placeholders is refused here (`check_client_input`).
This module knows nothing about HTTP.
"""

from __future__ import annotations

from typing import Any, Literal

from gateway.errors import InvalidRequest
from gateway.protocol import (
    FORBIDDEN_FIELDS,
    ChatCompletionRequest,
    ChatMessage,
    iter_texts,
    system_text,
)
from gateway.variants import ServedModel, Variant
from safeprompt.embeds import EMBEDS_SENTINEL, safety_system_message

Policy = Literal["prepend", "replace", "reject"]


def check_client_input(request: ChatCompletionRequest) -> None:
    """Refuse requests that could carry tensors or the reserved sentinel to vLLM (400).

    Security: vLLM decodes prompt_embeds with torch.load and trusts their shape (it is documented
    as trusted-users-only). Only the gateway may send them; content-part types are allow-listed in
    the protocol model, forbidden top-level fields are checked here, and the sentinel text is
    refused anywhere in the messages, tools or other fields.
    """
    # None of the forbidden fields is modelled, so a client's ends up among the extra fields.
    forbidden = sorted(FORBIDDEN_FIELDS & set(request.model_extra or {}))
    if forbidden:
        raise InvalidRequest(f"field '{forbidden[0]}' is not accepted by this gateway", param=forbidden[0])
    for text in iter_texts(request.model_dump(exclude_unset=True)):
        if EMBEDS_SENTINEL in text:
            raise InvalidRequest(f"text may not contain the reserved placeholder {EMBEDS_SENTINEL}", param="messages")


def apply_safety_prompt(
    messages: list[dict[str, Any]],
    *,
    kind: Literal["none", "text", "soft"],
    text: str | None = None,
    encoded_embeds: str | None = None,
    policy: Policy = "prepend",
) -> list[dict[str, Any]]:
    """Messages for vLLM with the safety prompt as the first system message.

    `messages` are the client's messages as plain dicts. The client's system message is the one at
    index 0 with role "system"; later system messages are left where they are.
    - prepend (default): one system message, safety prompt first, then the client's system text.
      The safety prompt keeps exactly the position and left context it was trained with; only
      what follows it changes. A soft prompt is joined to the client's text by vLLM (newline).
    - replace: the client's system message is dropped, so the prompt is token-for-token the
      trained one.
    - reject: a request with its own system message is refused with 400.
    With kind "none", the messages pass unchanged.
    """
    if kind == "none":
        return messages
    rest = list(messages)
    client_system: str | None = None
    if rest and rest[0].get("role") == "system":
        if policy == "reject":
            raise InvalidRequest(
                "this model applies a safety system prompt; a client system message is not accepted "
                "(system_message_policy=reject)",
                param="messages",
            )
        first = rest.pop(0)
        if policy == "prepend":
            client_system = system_text(ChatMessage.model_validate(first)) or None
    if kind == "text":
        assert text is not None
        return [safety_system_message(text=text, client_text=client_system), *rest]
    assert encoded_embeds is not None
    return [safety_system_message(encoded_embeds=encoded_embeds, client_text=client_system), *rest]


def build_upstream_body(
    request: ChatCompletionRequest, model: ServedModel, variant: Variant, *, policy: Policy
) -> dict[str, Any]:
    """The body vLLM receives: the client's fields, the upstream model name, the messages with the
    variant's safety prompt, and (for streams) usage always on, for the token metrics; the relay
    strips the usage chunk again when the client did not ask for it."""
    body = request.forwarded_fields()
    body["model"] = model.upstream_name
    body["messages"] = apply_safety_prompt(
        request.message_dicts(),
        kind=variant.kind,
        text=variant.text,
        encoded_embeds=variant.encoded_embeds,
        policy=policy,
    )
    if request.stream:
        body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
    return body
