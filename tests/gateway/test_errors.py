"""The one mapping from exceptions to OpenAI error envelopes (gateway/errors.py)."""

from __future__ import annotations

import logging

import orjson
import pytest
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from gateway.errors import (
    GatewayError,
    ModelNotFound,
    RouteNotServed,
    error_payload,
    error_response,
    error_sse,
    to_gateway_error,
)
from gateway.protocol import ChatCompletionRequest


def test_gateway_errors_stay_themselves() -> None:
    error = ModelNotFound("no such model", param="model")
    assert to_gateway_error(error) is error
    assert error_payload(error) == {"error": {"message": "no such model", "type": "invalid_request_error",
                                              "param": "model", "code": "model_not_found"}}


def test_validation_errors_are_400_naming_the_field() -> None:
    with pytest.raises(ValidationError) as caught:
        ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "wizard"}]})
    error = to_gateway_error(caught.value)
    assert (error.status_code, error.kind, error.param) == (400, "invalid_request", "messages.0.role")
    assert error.message.startswith("messages.0.role: ")


def test_routing_errors_keep_their_status_and_headers() -> None:
    error = to_gateway_error(HTTPException(405, "Method Not Allowed", headers={"Allow": "POST"}))
    assert isinstance(error, RouteNotServed)
    response = error_response(error, headers={"X-Request-Id": "r"})
    assert response.status_code == 405
    assert response.headers["Allow"] == "POST" and response.headers["X-Request-Id"] == "r"
    assert orjson.loads(response.body)["error"]["code"] == "method_not_allowed"


def test_anything_else_is_a_generic_500_logged_with_its_traceback(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="gateway.errors"):
        error = to_gateway_error(KeyError("secret detail"))
    assert type(error) is GatewayError and error.status_code == 500 and error.kind == "internal"
    assert "secret detail" not in error.message
    assert "secret detail" in caplog.text


def test_a_failed_stream_ends_with_one_error_event_then_done() -> None:
    body = error_sse(ModelNotFound("gone"))
    first, second, rest = body.split(b"\n\n")
    assert orjson.loads(first.removeprefix(b"data: "))["error"]["message"] == "gone"
    assert (second, rest) == (b"data: [DONE]", b"")
