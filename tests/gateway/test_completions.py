"""`POST /v1/chat/completions` in-process: the real app in front of a scripted mock vLLM over real
HTTP on loopback, checked on what the client gets and on the metrics."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

import httpx
import orjson
import pytest
from fastapi.testclient import TestClient

from gateway.app import build_app
from gateway.service import Service
from stack.processes import free_port
from tests.gateway.fault_upstream import ThreadedServer
from tests.gateway.mock_vllm import (
    ROUTE,
    Handler,
    Upstream,
    answer,
    chunk,
    events,
    gateway_settings,
    post,
    sample,
    sse,
    start_gateway,
)
from tests.gateway.scripted_upstream import Reply, ScriptedUpstream


@pytest.fixture
def serve() -> Iterator[Callable[[Handler], tuple[TestClient, Service, Upstream]]]:
    """`serve(chat)` starts the gateway (lifespan included) in front of a mock vLLM answering `chat`."""
    with contextlib.ExitStack() as running:
        yield lambda chat: start_gateway(running, chat)


def test_answer_carries_the_asked_model_and_the_variant(serve) -> None:
    client, service, upstream = serve(lambda request: Reply(json=answer("Bread needs flour.")))
    response = post(client, top_k=3)
    assert response.status_code == 200
    assert response.headers["X-Safety-Variant"] == "short" and response.headers["X-Request-Id"] == "req-1"
    assert response.json()["model"] == "tiny"
    assert response.json()["choices"][0]["message"]["content"] == "Bread needs flour."
    sent = upstream.bodies[0]
    assert sent["model"] == "tiny-llama" and sent["top_k"] == 3
    assert [message["role"] for message in sent["messages"]] == ["system", "user"]
    assert sample(service, "dro_gateway_requests_total", route=ROUTE, status="200") == 1
    assert sample(service, "dro_gateway_answers_judged_total", judge="paper") == 1
    assert sample(service, "dro_gateway_refusals_total", judge="paper") == 0
    assert sample(service, "dro_gateway_completion_tokens_total") == 4
    assert sample(service, "dro_gateway_requests_in_flight", route=ROUTE) == 0


def test_stream_is_relayed_and_its_verdict_counted(serve) -> None:
    usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    parts = [chunk("I cannot "), chunk("help"), chunk(" with that."), chunk(None, usage), b"data: [DONE]\n\n"]
    client, service, upstream = serve(lambda request: sse(parts))
    response = post(client, stream=True)
    assert response.status_code == 200 and response.headers["X-Safety-Variant"] == "short"
    sent = events(response)
    assert sent[-1] == "[DONE]"
    chunks = [orjson.loads(event) for event in sent[:-1]]
    assert ["".join(c["choices"][0]["delta"]["content"] for c in chunks)] == ["I cannot help with that."]
    assert all(c["model"] == "tiny" and "usage" not in c for c in chunks)  # usage was not asked for
    assert upstream.bodies[0]["stream_options"] == {"include_usage": True}
    assert sample(service, "dro_gateway_answers_judged_total", judge="paper") == 1
    assert sample(service, "dro_gateway_refusals_total", judge="paper") == 1
    assert sample(service, "dro_gateway_completion_tokens_total") == 3
    assert sample(service, "dro_gateway_time_to_first_token_seconds_count", route=ROUTE) == 1
    assert sample(service, "dro_gateway_requests_in_flight", route=ROUTE) == 0

    asked = post(client, stream=True, stream_options={"include_usage": True})
    assert orjson.loads(events(asked)[-2])["usage"] == usage


def test_upstream_500_is_a_502_envelope(serve) -> None:
    failing = Reply(500, json={"error": {"message": "engine died", "type": "InternalServerError"}})
    client, service, _ = serve(lambda request: failing)
    for stream in (False, True):
        response = post(client, stream=stream)
        assert response.status_code == 502
        assert response.headers["X-Safety-Variant"] == "short"
        assert response.json() == {"error": {"message": "vLLM failed with HTTP 500: engine died",
                                             "type": "upstream_error", "param": None, "code": None}}
    assert sample(service, "dro_gateway_upstream_errors_total", kind="upstream_5xx") == 2
    assert sample(service, "dro_gateway_requests_total", route=ROUTE, status="502") == 2


def test_invalid_request_is_a_400_naming_the_field(serve) -> None:
    client, service, upstream = serve(lambda request: Reply(json=answer("unused")))
    response = post(client, temperature=3.0)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == "temperature"
    assert error["message"].startswith("temperature: ")
    assert response.headers["X-Safety-Variant"] == "unknown"
    assert upstream.bodies == []
    labels = {"model": "unknown", "variant": "unknown"}
    registry = service.metrics.registry
    assert registry.get_sample_value("dro_gateway_request_errors_total", {**labels, "kind": "invalid_request"}) == 1


# A chunk the gateway's accounting cannot read (`delta` is not an object): a bug of the gateway's,
# surfaced by odd upstream output, as `broken` below is for a whole answer.
ODD_CHUNK = b'data: {"choices": [{"index": 0, "delta": "not an object"}]}\n\n'


def test_unexpected_error_in_a_stream_ends_with_an_error_event_then_done() -> None:
    """Over real HTTP both ways (the gateway in uvicorn), so that the client can read the first chunk
    before the mock vLLM sends the one that breaks the gateway: what came before was relayed."""
    relayed = threading.Event()
    upstream = Upstream(lambda request: sse([chunk("Sure, "), relayed, ODD_CHUNK, b"data: [DONE]\n\n"]))
    with ScriptedUpstream(upstream) as server:
        app = build_app(gateway_settings(server.url))
        service = app.state.service
        port = free_port()
        with ThreadedServer(app, port), httpx.stream(
                "POST", f"http://127.0.0.1:{port}{ROUTE}", timeout=30,
                json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": True}) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            sent = [next(line for line in lines if line.startswith("data: "))[6:]]
            relayed.set()
            rest = list(lines)
    sent += [line[6:] for line in rest if line.startswith("data: ")]
    assert sent[-1] == "[DONE]"
    assert orjson.loads(sent[-2]) == {"error": {"message": "internal error in the gateway", "type": "internal_error",
                                                "param": None, "code": None}}
    assert orjson.loads(sent[0])["choices"][0]["delta"]["content"] == "Sure, "
    assert len(sent) == 3
    assert "not an object" not in "".join(rest) and "Traceback" not in "".join(rest)
    assert sample(service, "dro_gateway_request_errors_total", kind="internal") == 1
    assert sample(service, "dro_gateway_requests_total", route=ROUTE, status="200") == 1
    assert sample(service, "dro_gateway_answers_judged_total", judge="paper") == 1
    assert sample(service, "dro_gateway_requests_in_flight", route=ROUTE) == 0


def test_unexpected_error_before_the_answer_is_a_500_recorded_as_internal(serve) -> None:
    broken = answer("x")
    broken["choices"][0]["message"] = "not an object"
    client, service, _ = serve(lambda request: Reply(json=broken))
    response = post(client)
    assert response.status_code == 500
    assert response.json()["error"] == {"message": "internal error in the gateway", "type": "internal_error",
                                        "param": None, "code": None}
    assert response.headers["X-Safety-Variant"] == "short"
    assert sample(service, "dro_gateway_request_errors_total", kind="internal") == 1
    assert sample(service, "dro_gateway_requests_total", route=ROUTE, status="500") == 1
    assert sample(service, "dro_gateway_requests_in_flight", route=ROUTE) == 0
