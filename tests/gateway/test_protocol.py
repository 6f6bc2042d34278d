"""The request model (gateway/protocol.py): parsing, unmodelled fields forwarded, allow-listed content
parts, and validation errors naming the parameter (mapped by gateway.errors.to_gateway_error)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from gateway.errors import InvalidRequest, to_gateway_error
from gateway.protocol import ChatCompletionRequest


def parse_request(raw: dict) -> ChatCompletionRequest:
    """Parse as the chat route does: a validation error becomes the client's InvalidRequest."""
    try:
        return ChatCompletionRequest.model_validate(raw)
    except ValidationError as exc:
        raise to_gateway_error(exc) from None


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




def test_messages_are_kept_as_sent() -> None:
    messages = [{"role": "assistant", "tool_calls": [{"id": "call-1"}], "name": "bot"},
                {"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    request, _ = _request(messages=messages)
    assert request.message_dicts() == messages


def test_usage_is_wanted_only_when_asked() -> None:
    assert not _request(stream=True)[0].wants_usage
    assert _request(stream=True, stream_options={"include_usage": True})[0].wants_usage
