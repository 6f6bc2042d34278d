"""Unit tests: request parsing, client-input security checks, the system-message policies and the
prompt_embeds wire format."""

from __future__ import annotations

import io

import pybase64
import pytest
import torch

from gateway.chat import parse_request
from gateway.errors import InvalidRequest
from gateway.protocol import ChatCompletionRequest
from gateway.splice import apply_safety_prompt, check_client_input
from safeprompt.embeds import encode_prompt_embeds


def _request(**fields) -> tuple[ChatCompletionRequest, dict]:
    raw = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **fields}
    return parse_request(raw), raw


def test_unmodelled_fields_are_forwarded() -> None:
    request, _ = _request(top_k=5, structured_outputs={"choice": ["a", "b"]}, temperature=0.5)
    assert request.forwarded_fields() == {"top_k": 5, "structured_outputs": {"choice": ["a", "b"]},
                                          "temperature": 0.5}


@pytest.mark.parametrize("fields, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"n": 0}, "n"),
    ({"temperature": 3.0}, "temperature"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"model": ""}, "model"),
])
def test_invalid_fields_name_the_parameter(fields: dict, param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        _request(**fields)
    assert caught.value.param == param
    assert caught.value.status_code == 400


def test_client_prompt_embeds_part_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="prompt_embeds"):
        _request(messages=[{"role": "user", "content": [{"type": "prompt_embeds", "data": "AAAA"}]}])


@pytest.mark.parametrize("part_type", ["image_embeds", "audio_embeds", "something_new"])
def test_other_tensor_parts_are_refused(part_type: str) -> None:
    with pytest.raises(InvalidRequest, match=part_type):
        _request(messages=[{"role": "user", "content": [{"type": part_type, "data": "AAAA"}]}])


@pytest.mark.parametrize("raw_extra", [
    {"messages": [{"role": "user", "content": "please <prompt_embeds> here"}]},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "x<prompt_embeds>"}]}]},
    {"messages": [{"role": "user", "content": "hi"}],
     "tools": [{"type": "function", "function": {"name": "f", "description": "<prompt_embeds>"}}]},
])
def test_reserved_sentinel_is_refused_anywhere(raw_extra: dict) -> None:
    request, raw = _request(**raw_extra)
    with pytest.raises(InvalidRequest, match="reserved placeholder"):
        check_client_input(request, raw)


@pytest.mark.parametrize("field", ["prompt_embeds", "chat_template", "return_token_ids"])
def test_forbidden_fields_are_refused(field: str) -> None:
    request, raw = _request(**{field: "x"})
    with pytest.raises(InvalidRequest) as caught:
        check_client_input(request, raw)
    assert caught.value.param == field


MESSAGES = [{"role": "system", "content": "Talk like a pirate."}, {"role": "user", "content": "hi"}]


def test_prepend_keeps_the_safety_prompt_first() -> None:
    out = apply_safety_prompt(MESSAGES, kind="text", text="Be safe.", policy="prepend")
    assert out == [{"role": "system", "content": "Be safe.\n\nTalk like a pirate."},
                   {"role": "user", "content": "hi"}]
    soft = apply_safety_prompt(MESSAGES, kind="soft", encoded_embeds="B64", policy="prepend")
    assert soft[0]["content"] == [{"type": "prompt_embeds", "data": "B64"},
                                  {"type": "text", "text": "Talk like a pirate."}]
    assert soft[1:] == MESSAGES[1:]


def test_replace_drops_the_client_system_message() -> None:
    out = apply_safety_prompt(MESSAGES, kind="soft", encoded_embeds="B64", policy="replace")
    assert out == [{"role": "system", "content": [{"type": "prompt_embeds", "data": "B64"}]},
                   {"role": "user", "content": "hi"}]


def test_reject_refuses_a_client_system_message_but_not_its_absence() -> None:
    with pytest.raises(InvalidRequest, match="system_message_policy=reject"):
        apply_safety_prompt(MESSAGES, kind="text", text="Be safe.", policy="reject")
    out = apply_safety_prompt(MESSAGES[1:], kind="text", text="Be safe.", policy="reject")
    assert out[0] == {"role": "system", "content": "Be safe."}


def test_none_variant_passes_messages_unchanged() -> None:
    assert apply_safety_prompt(MESSAGES, kind="none", policy="reject") == MESSAGES


def test_prepend_flattens_text_parts_of_a_client_system_message() -> None:
    messages = [{"role": "system", "content": [{"type": "text", "text": "A"}, {"type": "text", "text": "B"}]},
                {"role": "user", "content": "hi"}]
    out = apply_safety_prompt(messages, kind="text", text="S", policy="prepend")
    assert out[0]["content"] == "S\n\nA\nB"


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
