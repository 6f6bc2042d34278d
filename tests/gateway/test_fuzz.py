"""Fuzzing the chat route, in process (a mock vLLM on loopback, so every 5xx would be the gateway's own):

- from the OpenAPI document (`gateway/openapi.py`) with schemathesis: requests that fit the schema
  (positive) and requests that break it (negative);
- from the request model with hypothesis: a valid request with any part replaced by arbitrary JSON,
  unknown fields added, odd content parts and roles; and bodies that are arbitrary JSON or bytes.

For every request: no 5xx, an error is a well-formed OpenAI envelope (message, type, param, code)
without a traceback, a 200 is a chat completion (or a stream ending in [DONE]), and the gateway's
request counter grows by exactly one. Bounded and derandomized (the same examples on every run).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from gateway.app import build_app
from gateway.settings import ModelConfig, Settings
from stack.processes import free_port
from tests.gateway.mock_vllm import ROUTE, Upstream, answer, chunk
from tests.gateway.scripted_upstream import Received, Reply, ScriptedUpstream

FUZZ = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def _upstream(request: Received) -> Reply:
    body = orjson.loads(request.body)
    if body.get("stream"):
        usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
        return Reply(body=chunk("I cannot") + chunk(None, usage) + b"data: [DONE]\n\n",
                     headers={"Content-Type": "text/event-stream"})
    return Reply(json=answer("I cannot help with that."))


def _app(upstream_url: str):
    config = Settings(upstream_urls=[upstream_url], models=[ModelConfig(name="tiny", upstream_model="tiny-llama",
                                                                        allowed_extra_fields=["logit_bias"])])
    return build_app(config)


# The schema is read from an app of its own: loading it runs an app's lifespan once (its upstream,
# a port nobody listens on, only fails a health probe); the app under test is built in the fixture.
SCHEMA = schemathesis.openapi.from_asgi("/openapi.json", _app(f"http://127.0.0.1:{free_port()}"))
CHAT = SCHEMA[ROUTE]["POST"]
SERVED_IDS = ["tiny", "tiny@none", "tiny@default", "tiny@short", "tiny@mistral"]


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with ScriptedUpstream(Upstream(_upstream)) as upstream, \
            TestClient(_app(upstream.url), raise_server_exceptions=False) as running:  # lifespan: the pool runs
        yield running


def _requests_counted(client: TestClient) -> float:
    total = 0.0
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("dro_gateway_requests_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def check_exchange(client: TestClient, send) -> httpx.Response:
    before = _requests_counted(client)
    response = send()
    assert response.status_code < 500, response.text
    assert "Traceback" not in response.text
    if response.status_code == 200:
        if response.headers["content-type"].startswith("text/event-stream"):
            assert response.text.rstrip().endswith("data: [DONE]"), response.text
        else:
            assert response.json()["object"] == "chat.completion"
    else:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"]
        assert isinstance(error["type"], str) and error["type"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["param"] is None or isinstance(error["param"], str)
        assert error["code"] is None or isinstance(error["code"], str)
    assert _requests_counted(client) - before == 1, "a request was not counted exactly once"
    return response


def _send_case(client: TestClient, case) -> httpx.Response:
    kwargs: dict[str, Any] = {"headers": dict(case.headers or {})}
    body = case.body
    if isinstance(body, (dict, list, str, int, float, bool)) or body is None:
        kwargs["content"] = json.dumps(body)  # json, not orjson: negative cases may hold NaN
        kwargs["headers"]["content-type"] = "application/json"
    return client.request(case.method, case.formatted_path, **kwargs)


def _served(case, model: str):
    """A schema-conforming case addressed to a served model id (the schema's `model` is any string)."""
    if isinstance(case.body, dict):
        case.body["model"] = model
    return case


@FUZZ
@given(case=CHAT.as_strategy(GenerationMode.POSITIVE))
def test_schema_conforming_requests(client: TestClient, case) -> None:
    check_exchange(client, lambda: _send_case(client, case))


@FUZZ
@given(case=st.builds(_served, CHAT.as_strategy(GenerationMode.POSITIVE), st.sampled_from(SERVED_IDS)))
def test_schema_conforming_requests_to_served_models(client: TestClient, case) -> None:
    check_exchange(client, lambda: _send_case(client, case))


@FUZZ
@given(case=CHAT.as_strategy(GenerationMode.NEGATIVE))
def test_schema_breaking_requests(client: TestClient, case) -> None:
    response = check_exchange(client, lambda: _send_case(client, case))
    assert response.status_code != 200 or isinstance(case.body, dict)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
PARTS = st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "prompt_embeds", "input_audio", 7, None,
                                                         ["text"]])},
                              optional={"text": JSON, "data": JSON, "image_url": JSON})
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "developer", "assistant", "tool", "function", "", 3, None])},
    optional={"content": st.text(max_size=30) | st.lists(PARTS, max_size=3) | JSON, "name": JSON,
              "tool_calls": JSON, "tool_call_id": JSON},
)
VALID = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


@st.composite
def mutated_requests(draw) -> Any:
    body: dict[str, Any] = json.loads(json.dumps(VALID))
    for _ in range(draw(st.integers(0, 3))):
        choice = draw(st.sampled_from(["field", "extra", "messages", "model", "stream"]))
        if choice == "field":
            body[draw(st.sampled_from(["max_tokens", "n", "temperature", "top_p", "seed", "user", "stream_options",
                                       "max_completion_tokens", "logit_bias", "stream"]))] = draw(JSON)
        elif choice == "extra":
            body[draw(st.text(max_size=12))] = draw(JSON)
        elif choice == "messages":
            body["messages"] = draw(st.lists(MESSAGE, max_size=4) | JSON)
        elif choice == "model":
            body["model"] = draw(st.sampled_from(["tiny@none", "tiny@dro", "tiny@", "@", "tiny@short", "", "x"])
                                 | st.text(max_size=10) | JSON)
        else:
            body["stream"] = True
            body["stream_options"] = draw(st.none() | st.fixed_dictionaries({"include_usage": JSON}))
    return body


@FUZZ
@given(body=mutated_requests())
def test_mutated_valid_requests(client: TestClient, body: Any) -> None:
    check_exchange(client, lambda: client.post(ROUTE, content=json.dumps(body),
                                               headers={"content-type": "application/json"}))


@FUZZ
@given(raw=st.binary(max_size=200) | JSON.map(lambda value: json.dumps(value).encode()))
def test_arbitrary_bodies(client: TestClient, raw: bytes) -> None:
    check_exchange(client, lambda: client.post(ROUTE, content=raw, headers={"content-type": "application/json"}))


def test_the_checks_catch_a_server_error(client: TestClient) -> None:
    """The oracle is not vacuous: a handler that raises is seen as a 500 envelope and fails the check."""
    with contextlib.suppress(AssertionError):
        check_exchange(client, lambda: httpx.Response(500, json={"error": {"message": "x", "type": "internal"}}))
        pytest.fail("a 500 passed the check")
