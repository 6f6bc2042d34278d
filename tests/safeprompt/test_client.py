"""The offline chat client's faults, against an in-process fake (httpx.MockTransport): error events
mid-stream, streams cut short of `[DONE]`, HTTP errors and retries. Its normal answers are tested
against the real vLLM server (tests/evaluation/test_harness_integration.py, tests/trainer/test_label.py)."""

from __future__ import annotations

import json

import httpx
import pytest

from safeprompt.client import ChatClient, ChatRequestError, StreamError, normalise_base_url, read_sse_events

BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def chunk(text: str, finish_reason: str | None = None) -> str:
    return (
        "data: "
        + json.dumps({"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish_reason}]})
        + "\n\n"
    )


def sse(*events: str) -> httpx.Response:
    return httpx.Response(200, headers={"content-type": "text/event-stream"}, content="".join(events).encode())


def fake_client(handler, **kwargs) -> ChatClient:
    return ChatClient("http://fake", transport=httpx.MockTransport(handler), backoff_s=0.0, **kwargs)


def test_a_whole_stream_is_read_to_done() -> None:
    with fake_client(lambda request: sse(chunk("Hello"), chunk(" world", "stop"), "data: [DONE]\n\n")) as client:
        completion = client.stream_until(BODY, lambda text: False)
    assert (completion.text, completion.finish_reason) == ("Hello world", "stop")


@pytest.mark.parametrize(
    "error_event",
    [
        {"error": {"message": "upstream vLLM failed", "type": "upstream_error", "code": 502}},  # the gateway's
        {
            "object": "error",
            "message": "upstream vLLM failed",
            "type": "InternalServerError",
            "code": 500,
        },  # older vLLM
    ],
)
def test_an_error_event_mid_stream_raises(error_event: dict) -> None:
    requests = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return sse(chunk("Sure, here"), "data: " + json.dumps(error_event) + "\n\n", "data: [DONE]\n\n")

    with fake_client(handler) as client, pytest.raises(StreamError, match="upstream vLLM failed"):
        client.stream_until(BODY, lambda text: False)
    assert len(requests) == 1  # an answer had started: not retried


def test_a_stream_without_done_raises_instead_of_returning_a_truncated_answer() -> None:
    with (
        fake_client(lambda request: sse(chunk("Sure, here is how"))) as client,
        pytest.raises(StreamError, match=r"without data: \[DONE\]"),
    ):
        client.stream_until(BODY, lambda text: False)


def test_hanging_up_early_needs_no_done() -> None:
    with fake_client(lambda request: sse(chunk("I cannot"), chunk(" help"))) as client:
        completion = client.stream_until(BODY, lambda text: "cannot" in text)
    assert (completion.text, completion.finish_reason) == ("I cannot", "judged")


def test_http_500_is_an_error_with_the_servers_message_and_not_retried() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(500, json={"error": {"message": "engine died", "type": "internal"}})

    with fake_client(handler) as client:
        with pytest.raises(ChatRequestError, match="HTTP 500: engine died"):
            client.stream_until(BODY, lambda text: False)
        with pytest.raises(ChatRequestError, match="HTTP 500: engine died"):
            client.complete(BODY)
    assert len(calls) == 2


def test_503_and_connection_errors_are_retried_then_reported() -> None:
    statuses = iter([503, 200])

    def flaky(request: httpx.Request) -> httpx.Response:
        status = next(statuses)
        return sse(chunk("ok", "stop"), "data: [DONE]\n\n") if status == 200 else httpx.Response(status, text="busy")

    with fake_client(flaky) as client:
        assert client.stream_until(BODY, lambda text: False).text == "ok"

    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with fake_client(refused, retries=2) as client, pytest.raises(ChatRequestError, match="after 3 attempts.*refused"):
        client.complete(BODY)


def test_the_sse_reader_skips_comments_and_rejects_garbage() -> None:
    lines = [": keep-alive", "event: message", 'data: {"choices": []}', "", "data: [DONE]", 'data: {"late": 1}']
    assert list(read_sse_events(lines)) == [{"choices": []}]
    with pytest.raises(StreamError, match="not JSON"):
        list(read_sse_events(["data: {oops"]))


def test_base_urls_are_normalised() -> None:
    assert normalise_base_url("http://h:1") == normalise_base_url("http://h:1/v1/") == "http://h:1/v1"
    with pytest.raises(ValueError, match="http://"):
        normalise_base_url("h:1")
