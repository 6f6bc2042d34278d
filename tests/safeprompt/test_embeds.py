"""vLLM's prompt-embeds wire format and the safety system message."""

from __future__ import annotations

import io

import pybase64
import pytest
import torch

from safeprompt.embeds import prompt_embeds_part, safety_system_message, wire_dtype
from safeprompt.torch_payload import TORCH_DTYPES, encode_prompt_embeds


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prompt_embeds_round_trip_keeps_values_and_dtype(dtype: torch.dtype) -> None:
    tensor = torch.randn(5, 8).to(dtype)
    decoded = torch.load(io.BytesIO(pybase64.b64decode(encode_prompt_embeds(tensor))), weights_only=True)
    assert decoded.dtype == dtype
    assert torch.equal(decoded, tensor)


def test_prompt_embeds_widens_float16_and_saves_only_the_view() -> None:
    big = torch.randn(1000, 64, dtype=torch.float16)
    encoded = encode_prompt_embeds(big[:2])
    decoded = torch.load(io.BytesIO(pybase64.b64decode(encoded)), weights_only=True)
    assert decoded.dtype == torch.float32 and torch.equal(decoded, big[:2].float())
    assert len(encoded) < 4000  # not the whole 1000-row storage


def test_prompt_embeds_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError):
        encode_prompt_embeds(torch.randn(2, 3, 4))
    with pytest.raises(ValueError):
        encode_prompt_embeds(torch.ones(3, 4, dtype=torch.int64))


def test_safety_system_message_puts_the_prompt_first_and_joins_the_client_text() -> None:
    assert safety_system_message(text="Be safe.") == {"role": "system", "content": "Be safe."}
    assert safety_system_message(text="Be safe.", client_text="Be brief.")["content"] == "Be safe.\n\nBe brief."
    soft = safety_system_message(encoded_embeds="B64", client_text="Be brief.")
    assert soft["content"] == [prompt_embeds_part("B64"), {"type": "text", "text": "Be brief."}]
    with pytest.raises(ValueError):
        safety_system_message(text="a", encoded_embeds="b")


def _decode(encoded: str) -> torch.Tensor:
    return torch.load(io.BytesIO(pybase64.b64decode(encoded)), weights_only=True)


@pytest.mark.parametrize("serving", ["bfloat16", "float16", "float32"])
def test_prompt_embeds_sent_in_the_serving_dtype_are_what_the_server_would_cast_to(serving: str) -> None:
    trained = torch.randn(16, 512)  # float32, as the trainer writes it
    sent = _decode(encode_prompt_embeds(trained, serving))
    assert sent.dtype == TORCH_DTYPES[serving]
    # vLLM casts what it receives to the dtype it computes in: one rounding, the same as here.
    assert torch.equal(sent.to(TORCH_DTYPES[serving]), trained.to(TORCH_DTYPES[serving]))
    if serving != "float32":
        assert len(encode_prompt_embeds(trained, serving)) < 0.6 * len(encode_prompt_embeds(trained))


def test_wire_dtype_never_invents_a_third_dtype() -> None:
    assert wire_dtype("float32", None) == "float32"
    assert wire_dtype("bfloat16", None) == "bfloat16"
    assert wire_dtype("float16", None) == "float32"
    assert wire_dtype("float64", None) == "float32"
    assert wire_dtype("float32", "bfloat16") == "bfloat16"
    with pytest.raises(ValueError):
        wire_dtype("float32", "int8")
