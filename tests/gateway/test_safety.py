"""The safety prompt (gateway/safety.py): client-input security checks, the system-message policies,
and the upstream body built from the parsed request."""

from __future__ import annotations

import pytest

from gateway.errors import InvalidRequest
from gateway.protocol import ChatCompletionRequest
from gateway.safety import apply_safety_prompt, build_upstream_body, check_client_input
from gateway.variants import ServedModel, Variant


def _request(**fields) -> tuple[ChatCompletionRequest, dict]:
    raw = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **fields}
    return ChatCompletionRequest.model_validate(raw), raw


@pytest.mark.parametrize("raw_extra", [
    {"messages": [{"role": "user", "content": "please <prompt_embeds> here"}]},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "x<prompt_embeds>"}]}]},
    {"messages": [{"role": "user", "content": "hi"}],
     "tools": [{"type": "function", "function": {"name": "f", "description": "<prompt_embeds>"}}]},
])
def test_reserved_sentinel_is_refused_anywhere(raw_extra: dict) -> None:
    request, raw = _request(**raw_extra)
    with pytest.raises(InvalidRequest, match="reserved placeholder"):
        check_client_input(request)


@pytest.mark.parametrize("field", ["prompt_embeds", "chat_template", "return_token_ids"])
def test_forbidden_fields_are_refused(field: str) -> None:
    request, raw = _request(**{field: "x"})
    with pytest.raises(InvalidRequest) as caught:
        check_client_input(request)
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


SOFT = Variant(name="dro", kind="soft", encoded_embeds="B64", num_virtual_tokens=3)
MODEL = ServedModel(name="tiny", upstream_name="tiny-llama", default_variant="dro", variants={"dro": SOFT})


def test_upstream_body_forwards_the_client_fields_with_the_safety_prompt() -> None:
    request, raw = _request(messages=MESSAGES, top_k=5, temperature=0.5, user="u1")
    body = build_upstream_body(request, MODEL, SOFT, policy="replace")
    assert body == {"top_k": 5, "temperature": 0.5, "user": "u1", "model": "tiny-llama",
                    "messages": [{"role": "system", "content": [{"type": "prompt_embeds", "data": "B64"}]},
                                 {"role": "user", "content": "hi"}]}
    assert raw["messages"] == MESSAGES  # the client's request is not modified


def test_upstream_body_always_asks_for_usage_in_streams() -> None:
    request, _ = _request(stream=True, stream_options={"continuous_usage_stats": False})
    body = build_upstream_body(request, MODEL, SOFT, policy="prepend")
    assert body["stream"] is True
    assert body["stream_options"] == {"continuous_usage_stats": False, "include_usage": True}
    plain = build_upstream_body(_request()[0], MODEL, SOFT, policy="prepend")
    assert "stream_options" not in plain and "stream" not in plain
