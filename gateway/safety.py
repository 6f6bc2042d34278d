"""Put a safety prompt into a chat request: the one place that decides what vLLM sees.

- A text variant becomes the system message's text.
- A soft prompt becomes the system message whose content is exactly one `prompt_embeds` part; vLLM
  renders the model's chat template around it and expands its sentinel into the N rows, the same
  positions the trainer optimised (see docs/architecture.md). The payload is the artifact's own
  bytes (written by the trainer, checked and base64-encoded once at load time), never per request.
- Every client `system` and `developer` message, wherever it stands, is handled by the configured
  policy (see `apply_safety_prompt`).
- `build_upstream_body` is the whole request vLLM receives, built from the parsed request; it
  refuses unmodelled fields that are not allow-listed (`check_extra_fields`).

Client input that could inject tensors or placeholders is refused here (`check_client_input`).
This module knows nothing about HTTP.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, Literal

from gateway.errors import InvalidRequest
from gateway.protocol import (
    FORBIDDEN_FIELDS,
    FORWARDED_EXTRA_FIELDS,
    SYSTEM_ROLES,
    ChatCompletionRequest,
    iter_strings,
    text_parts,
)
from gateway.variants import ServedModel, Variant
from safeprompt.embeds import EMBEDS_SENTINEL, safety_system_message

Policy = Literal["prepend", "replace", "reject"]


def check_client_input(request: ChatCompletionRequest) -> None:
    """Refuse requests that could carry the reserved sentinel to vLLM (400).

    Security: vLLM decodes prompt_embeds with torch.load and trusts their shape (it is documented
    as trusted-users-only). Only the gateway may send them: content-part types are allow-listed in
    the protocol model, fields in `check_extra_fields`, and the sentinel is refused here
    in every string and every dict key of the request (a tool schema's property names reach the
    chat template too), and in each message's text parts concatenated (templates that concatenate
    parts would join "<prompt_" and "embeds>").
    """
    for text in iter_strings(request.model_dump(exclude_unset=True)):
        if EMBEDS_SENTINEL in text:
            raise _sentinel_refused("messages")
    for index, message in enumerate(request.messages):
        if EMBEDS_SENTINEL in "".join(text_parts(message.content)):
            raise _sentinel_refused(f"messages.{index}.content")


def _sentinel_refused(param: str) -> InvalidRequest:
    return InvalidRequest(f"text may not contain the reserved placeholder {EMBEDS_SENTINEL}", param=param)


def check_extra_fields(request: ChatCompletionRequest, allowed: Collection[str] = ()) -> None:
    """Refuse (400, naming it) the first unmodelled field that is neither forwarded by default nor
    enabled for this model (`allowed`, from `models[].allowed_extra_fields`).

    Security: vLLM acts on fields the gateway does not model (`continue_final_message`,
    `truncate_prompt_tokens`, `logit_bias`, ...), some of which remove or move the safety prompt,
    so forwarding is an allow-list, never a deny-list. None of the forbidden fields is modelled,
    so a client's ends up among the extra fields."""
    for name in request.extra_field_names():
        if name in FORBIDDEN_FIELDS:
            raise InvalidRequest(f"field '{name}' is not accepted by this gateway", param=name)
        if name not in FORWARDED_EXTRA_FIELDS and name not in allowed:
            raise InvalidRequest(
                f"field '{name}' is not accepted by this gateway for model '{request.model}' "
                "(not forwarded to vLLM; an operator may enable it in models[].allowed_extra_fields "
                "or api_keys[].allowed_extra_fields)",
                param=name,
            )


def apply_safety_prompt(
    messages: list[dict[str, Any]],
    *,
    kind: Literal["none", "text", "soft"],
    text: str | None = None,
    encoded_embeds: str | None = None,
    policy: Policy = "prepend",
) -> list[dict[str, Any]]:
    """Messages for vLLM with the safety prompt as the first and only system message.

    `messages` are the client's messages as plain dicts. Every message with role `system` or
    `developer`, wherever it stands, is a client system message:
    - prepend (default): the safety prompt first, then the client system messages' texts, in their
      order, joined by blank lines, in one system message; they are removed from where they stood.
      The safety prompt keeps exactly the position and left context it was trained with, and no
      later message carries the client's system authority past it (a template that accepts only a
      leading system message, such as Llama-2's or Mistral's, would otherwise fail). A soft prompt
      is joined to the client's text by vLLM (newline). Only text parts of a client system
      message are kept.
    - replace: every client system message is dropped, so the prompt is token-for-token the
      trained one.
    - reject: a request with any client system message is refused with 400 naming it.
    With kind "none", the messages pass unchanged.
    """
    if kind == "none":
        return messages
    system_indices = [index for index, message in enumerate(messages) if message.get("role") in SYSTEM_ROLES]
    if system_indices and policy == "reject":
        first = system_indices[0]
        raise InvalidRequest(
            f"this model applies a safety system prompt; a client {messages[first].get('role')} message is not "
            f"accepted (system_message_policy=reject; messages[{first}])",
            param=f"messages.{first}",
        )
    rest = [message for message in messages if message.get("role") not in SYSTEM_ROLES]
    client_system: str | None = None
    if policy == "prepend":
        texts = ("\n".join(text_parts(messages[index].get("content"))) for index in system_indices)
        client_system = "\n\n".join(text for text in texts if text) or None
    if kind == "text":
        assert text is not None
        return [safety_system_message(text=text, client_text=client_system), *rest]
    assert encoded_embeds is not None
    return [safety_system_message(encoded_embeds=encoded_embeds, client_text=client_system), *rest]


def build_upstream_body(
    request: ChatCompletionRequest,
    model: ServedModel,
    variant: Variant,
    *,
    policy: Policy,
    extra_fields: Collection[str] = frozenset(),
) -> dict[str, Any]:
    """The body vLLM receives: the client's fields (allow-listed: 400 otherwise; `extra_fields` are
    the ones the caller's key may send beyond the model's), the upstream model name, the messages
    with the variant's safety prompt, and (for streams) usage always on, for the token metrics; the
    relay strips the usage chunk again when the client did not ask for it."""
    check_extra_fields(request, model.allowed_extra_fields | set(extra_fields))
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
