"""A soft prompt on the wire: vLLM's `prompt_embeds` content part and the system message carrying it.

- `encode_prompt_embeds(tensor)`: base64 of `torch.save(tensor)`, vLLM's wire format.
- `prompt_embeds_part(encoded)`: the content part `{"type": "prompt_embeds", "data": ...}`.
- `safety_system_message(text=... | encoded_embeds=..., client_text=None)`: the system message that
  puts a safety prompt first: a human prompt as text, or a soft prompt as exactly one
  `prompt_embeds` part, which vLLM expands at its sentinel `EMBEDS_SENTINEL` into the N rows, at the
  positions the trainer optimised. The gateway and the evaluation harness both build it here.
Knows nothing about HTTP or policies.
"""

from __future__ import annotations

import io
from typing import Any

import pybase64
import torch

# vLLM renders a `prompt_embeds` content part as this sentinel token; the trainer places θ there.
EMBEDS_SENTINEL = "<prompt_embeds>"


def encode_prompt_embeds(tensor: torch.Tensor) -> str:
    """base64 of `torch.save(tensor)`, vLLM's prompt_embeds wire format. [n, hidden] -> str.

    float32 and bfloat16 are sent as they are (vLLM casts to the model dtype once); any other
    float dtype is widened to float32 first, since a third dtype would round twice.
    `.clone()` matters: torch.save writes a view's whole underlying storage.
    """
    if tensor.ndim != 2 or not tensor.is_floating_point():
        raise ValueError(f"soft prompt must be a 2-D float tensor, got {tuple(tensor.shape)} {tensor.dtype}")
    if tensor.dtype not in (torch.float32, torch.bfloat16):
        tensor = tensor.float()
    buffer = io.BytesIO()
    torch.save(tensor.detach().cpu().contiguous().clone(), buffer)
    return pybase64.b64encode(buffer.getvalue()).decode("ascii")


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
