"""A soft prompt on the wire: vLLM's `prompt_embeds` content part and the system message carrying it.

- `wire_dtype(stored, serving)`: the dtype a soft prompt is sent in (a name: float32, bfloat16, float16).
- `encode_payload(payload)`: base64 of a payload (the bytes of `torch.save(tensor)`, vLLM's wire
  format; the trainer writes them into the artifact, see `safeprompt.torch_payload`).
- `prompt_embeds_part(encoded)`: the content part `{"type": "prompt_embeds", "data": ...}`.
- `safety_system_message(text=... | encoded_embeds=..., client_text=None)`: the system message that
  puts a safety prompt first: a human prompt as text, or a soft prompt as exactly one
  `prompt_embeds` part, which vLLM expands at its sentinel `EMBEDS_SENTINEL` into the N rows, at the
  positions the trainer optimised. The gateway and the evaluation harness both build it here.
Knows nothing about HTTP or policies, and imports no torch: the gateway sends bytes it never decodes.
"""

from __future__ import annotations

from typing import Any

import pybase64

# vLLM renders a `prompt_embeds` content part as this sentinel token; the trainer places θ there.
EMBEDS_SENTINEL = "<prompt_embeds>"

# The dtypes vLLM may compute in, hence the dtypes a soft prompt may be sent in.
WIRE_DTYPES = ("float32", "bfloat16", "float16")


def wire_dtype(stored: str, serving: str | None) -> str:
    """The dtype a soft prompt stored as `stored` is sent in to a vLLM that computes in `serving`.

    vLLM casts prompt_embeds to the dtype it computes in, once. Sending exactly that dtype gives
    the same tensor on the server (the same single rounding, done by the trainer's export) in fewer
    bytes: half of float32's for bf16/fp16. Any third dtype would round twice (measured: fp16 sent
    to a bf16 server changed answers). So: `serving` when it is known (bfloat16, float16 or
    float32); else float32 and bfloat16 as stored, anything else widened to float32.
    """
    if serving is not None:
        if serving not in WIRE_DTYPES:
            raise ValueError(f"serving dtype must be one of {sorted(WIRE_DTYPES)}, got {serving!r}")
        return serving
    return stored if stored in ("float32", "bfloat16") else "float32"


def encode_payload(payload: bytes) -> str:
    """base64 of a prompt_embeds payload: the `data` of vLLM's `prompt_embeds` content part."""
    return pybase64.b64encode(payload).decode("ascii")


def prompt_embeds_part(encoded: str) -> dict[str, str]:
    return {"type": "prompt_embeds", "data": encoded}


def safety_system_message(
    *, text: str | None = None, encoded_embeds: str | None = None, client_text: str | None = None
) -> dict[str, Any]:
    """The first system message: the safety prompt, then (if given) the client's own system text.

    A text prompt is joined to the client's text with a blank line; a soft prompt is followed by a
    text part, which vLLM joins with a newline. Exactly one of `text` and `encoded_embeds`.
    """
    if (text is None) == (encoded_embeds is None):
        raise ValueError("give exactly one of text and encoded_embeds")
    content: Any
    if text is not None:
        content = text if client_text is None else f"{text}\n\n{client_text}"
    else:
        assert encoded_embeds is not None
        content = [prompt_embeds_part(encoded_embeds)]
        if client_text is not None:
            content.append({"type": "text", "text": client_text})
    return {"role": "system", "content": content}
