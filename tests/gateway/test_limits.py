"""Cheap requests that used to cost a 500 or unbounded work (gateway/limits.py, through the real chat
route with a mock vLLM): each is a 400 (or, for vLLM's oversize answer, a 502) in OpenAI's envelope,
counted as what it was, and nothing refused reaches vLLM."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from gateway.limits import json_depth_exceeds
from tests.gateway.mock_vllm import ROUTE, answer, error_of, ok, post, sample, start_gateway
from tests.gateway.scripted_upstream import Reply

UNKNOWN = {"model": "unknown", "variant": "unknown"}


@pytest.fixture
def running() -> Iterator[contextlib.ExitStack]:
    with contextlib.ExitStack() as stack:
        yield stack


def nested(levels: int) -> dict:
    value: dict = {}
    for _ in range(levels - 1):
        value = {"a": value}
    return value


@pytest.mark.parametrize("value, max_depth, exceeds", [
    (1, 0, False), ({}, 1, False), ({}, 0, True), ([[1]], 2, False), ([[1]], 1, True),
    (nested(300), 299, True), (nested(300), 300, False), ({"a": [1, {"b": {}}]}, 4, False), ({"a": [1, {"b": {}}]}, 3, True),
])
def test_json_depth(value: object, max_depth: int, exceeds: bool) -> None:
    assert json_depth_exceeds(value, max_depth) is exceeds


def _count(service, kind: str, labels: dict | None = None) -> float | None:
    return service.metrics.registry.get_sample_value("dro_gateway_request_errors_total",
                                                     {**(labels or UNKNOWN), "kind": kind})


@pytest.mark.parametrize("fields", [
    {"messages": [{"role": "user", "content": [{"type": ["text"]}]}]},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": ["hi"]}]}]},
    {"messages": [{"role": "system", "content": [{"type": "text", "text": {"a": 1}}]},
                  {"role": "user", "content": "hi"}]},
    {"metadata": nested(300)},
    {"messages": [{"role": "user", "content": "hi", "name": nested(100)}]},
], ids=["list-type", "list-text", "dict-text-in-system", "300-levels", "100-levels-in-a-message"])
def test_malformed_or_deep_input_is_a_400_not_a_500(running, fields: dict) -> None:
    client, service, upstream = start_gateway(running, ok)
    for stream in (False, True):
        response = post(client, stream=stream, **fields)
        assert response.status_code == 400, response.text
        assert error_of(response)["type"] == "invalid_request_error"
    assert upstream.bodies == []
    assert _count(service, "invalid_request") == 2
    assert _count(service, "internal") is None
    assert service.metrics.registry.get_sample_value(
        "dro_gateway_requests_total", {**UNKNOWN, "route": ROUTE, "status": "400"}) == 2


def test_too_many_messages_is_a_400(running) -> None:
    client, service, upstream = start_gateway(running, ok, max_messages=3)
    assert post(client, messages=[{"role": "user", "content": "hi"}] * 3).status_code == 200
    response = post(client, messages=[{"role": "user", "content": ""}] * 4)
    assert response.status_code == 400
    assert error_of(response)["param"] == "messages" and "at most 3 messages" in error_of(response)["message"]
    assert len(upstream.bodies) == 1


@pytest.mark.parametrize("fields, param", [
    ({"n": 4, "max_tokens": 26}, "max_tokens"),
    ({"n": 1, "max_completion_tokens": 101}, "max_completion_tokens"),
    ({"n": 2, "max_tokens": 10, "max_completion_tokens": 60}, "max_completion_tokens"),
    ({"n": 17}, "n"),
])
def test_generation_budget_is_bounded(running, fields: dict, param: str) -> None:
    client, service, upstream = start_gateway(running, ok, max_generated_tokens=100)
    response = post(client, **fields)
    assert response.status_code == 400
    assert error_of(response)["param"] == param
    assert upstream.bodies == []
    assert post(client, n=4, max_tokens=25).status_code == 200
    assert post(client, n=16).status_code == 200  # no max_tokens: vLLM bounds each choice by the context


def test_logprobs_count_against_their_own_budget(running) -> None:
    """n=16, 2,000 tokens and top_logprobs=20 made a 43 MiB answer: refused before vLLM is asked."""
    client, _, upstream = start_gateway(running, ok, max_logprob_entries=262144)
    heavy = post(client, n=16, max_tokens=2000, logprobs=True, top_logprobs=20)
    assert heavy.status_code == 400 and error_of(heavy)["param"] == "top_logprobs"
    assert "16 x 2000 x 21" in error_of(heavy)["message"] and upstream.bodies == []
    assert post(client, n=16, max_tokens=2000).status_code == 200  # no logprobs: only the token budget
    assert post(client, n=1, max_tokens=2000, logprobs=True, top_logprobs=20).status_code == 200
    assert post(client, n=16, max_tokens=2000, logprobs=False, top_logprobs=20).status_code == 200
    assert post(client, n=16, max_tokens=4000, logprobs=True).status_code == 200  # 64,000 entries fit
    assert post(client, n=16, max_tokens=4000, logprobs=True, top_logprobs=5).status_code == 400


def test_an_answer_larger_than_the_cap_is_a_502_counted_as_such(running) -> None:
    big = answer("x" * 5000)
    client, service, _ = start_gateway(running, lambda request: Reply(json=big), max_response_bytes=4096)
    response = post(client)
    assert response.status_code == 502
    error = error_of(response)
    assert error["code"] == "response_too_large" and "4096 bytes" in error["message"]
    assert sample(service, "dro_gateway_request_errors_total", kind="response_too_large") == 1
    assert sample(service, "dro_gateway_upstream_errors_total", kind="response_too_large") is None
    assert sample(service, "dro_gateway_requests_in_flight", route=ROUTE) == 0


def test_an_answer_without_a_declared_length_is_capped_while_it_is_read(running) -> None:
    parts = [b" " * 1000] * 10 + [b"{}"]  # JSON allows leading whitespace: only the size can refuse it
    reply = Reply(parts=parts, headers={"Content-Type": "application/json"})  # chunked: no declared length
    client, service, _ = start_gateway(running, lambda request: reply, max_response_bytes=4096)
    response = post(client)
    assert response.status_code == 502 and error_of(response)["code"] == "response_too_large"


def test_an_answer_under_the_cap_is_relayed_as_json(running) -> None:
    client, _, _ = start_gateway(running, ok, max_response_bytes=4096)
    response = post(client)
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    assert response.json()["model"] == "tiny"
    assert response.json()["choices"][0]["message"]["content"] == "Bread needs flour."
