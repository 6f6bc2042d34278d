"""The torch side of the wire format: a soft-prompt tensor -> vLLM's prompt_embeds payload.

- `payload_bytes(tensor, dtype)`: `torch.save` of the tensor cast to `dtype` (a name from
  `safeprompt.embeds.WIRE_DTYPES`), the bytes vLLM's `torch.load` reads.
- `encode_prompt_embeds(tensor, serving_dtype=None)`: base64 of the payload in
  `wire_dtype(tensor's dtype, serving_dtype)`, for a tensor that is not in an artifact (tests, benches).
The trainer's export writes these payloads into the artifact, so the gateway only reads bytes.
"""

from __future__ import annotations

import io

import torch

from safeprompt.embeds import WIRE_DTYPES, encode_payload, wire_dtype

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
assert set(TORCH_DTYPES) == set(WIRE_DTYPES)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def payload_bytes(tensor: torch.Tensor, dtype: str) -> bytes:
    """[n, hidden] float tensor -> `torch.save` bytes of it in `dtype`.

    `.clone()` matters: torch.save writes a view's whole underlying storage.
    """
    if tensor.ndim != 2 or not tensor.is_floating_point():
        raise ValueError(f"soft prompt must be a 2-D float tensor, got {tuple(tensor.shape)} {tensor.dtype}")
    if dtype not in TORCH_DTYPES:
        raise ValueError(f"payload dtype must be one of {sorted(TORCH_DTYPES)}, got {dtype!r}")
    buffer = io.BytesIO()
    torch.save(tensor.detach().to(device="cpu", dtype=TORCH_DTYPES[dtype]).contiguous().clone(), buffer)
    return buffer.getvalue()


def encode_prompt_embeds(tensor: torch.Tensor, serving_dtype: str | None = None) -> str:
    """base64 of the payload, sent in `wire_dtype(tensor.dtype, serving_dtype)`. [n, hidden] -> str."""
    return encode_payload(payload_bytes(tensor, wire_dtype(dtype_name(tensor.dtype), serving_dtype)))
