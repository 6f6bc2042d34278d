"""Deadlines and slow clients, over real HTTP on loopback (the gateway in uvicorn, the fault upstream
of tests/gateway/fault_upstream.py, which can hang, stall, drip forever or flood on demand):

- no first event within first_byte_timeout_s: 504 `first_byte_deadline` (the stream's status is
  not yet sent), well before the read timeout would fire;
- no end within request_timeout_s: a non-streaming request is a 504 `request_deadline`; a stream
  that keeps sending (each chunk within the read timeout, so nothing else would stop it) or went
  silent ends with one error event `request_deadline` then [DONE];
- a streaming client that stops reading: once one write waits client_write_timeout_s, the stream is
  cut and counted as `client_too_slow`;
in every case vLLM's request is closed (the fake upstream sees the hang-up), and each request is
counted once under its kind.
"""

from __future__ import annotations

import socket
import time

import httpx
import orjson
import pytest

from gateway.settings import ModelConfig, Settings
from gateway.app import build_app
from stack.processes import free_port
from tests.gateway.fault_upstream import SEEN, ThreadedServer, fault_app
from tests.metrics_text import metric_total

BEHAVIOURS = ["ok", "hang", "stall", "drip", "flood"]


@pytest.fixture(scope="module")
def gateway_url():
    upstream_port, gateway_port = free_port(), free_port()
    settings = Settings(upstream_urls=[f"http://127.0.0.1:{upstream_port}"], read_timeout_s=20.0,
                        first_byte_timeout_s=1.0, request_timeout_s=3.0, client_write_timeout_s=1.0,
                        models=[ModelConfig(name=name, default_variant="none") for name in BEHAVIOURS])
    with ThreadedServer(fault_app(), upstream_port), ThreadedServer(build_app(settings), gateway_port):
        yield f"http://127.0.0.1:{gateway_port}"


def _post(url: str, model: str, stream: bool) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = httpx.post(f"{url}/v1/chat/completions", timeout=30,
                          json={"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream})
    return response, time.monotonic() - started


def _kind(url: str, kind: str) -> float:
    return metric_total(httpx.get(f"{url}/metrics").text, "dro_gateway_request_errors_total", kind=kind)


def _wait(predicate, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "not within the time allowed"
        time.sleep(0.05)


def test_no_first_event_is_a_504_at_the_first_byte_deadline(gateway_url: str) -> None:
    before, aborted = _kind(gateway_url, "deadline_exceeded"), SEEN["hang_aborted"]
    response, elapsed = _post(gateway_url, "hang", stream=True)
    assert response.status_code == 504 and response.json()["error"]["code"] == "first_byte_deadline"
    assert 1.0 <= elapsed < 10, elapsed  # the deadline, not the 20 s read timeout
    _wait(lambda: SEEN["hang_aborted"] == aborted + 1, 5)
    assert _kind(gateway_url, "deadline_exceeded") == before + 1


def test_a_non_streaming_answer_past_the_request_deadline_is_a_504(gateway_url: str) -> None:
    response, elapsed = _post(gateway_url, "hang", stream=False)
    assert response.status_code == 504 and response.json()["error"]["code"] == "request_deadline"
    assert 3.0 <= elapsed < 12, elapsed


@pytest.mark.parametrize("model", ["drip", "stall"])
def test_a_stream_past_the_request_deadline_ends_with_an_error_event(gateway_url: str, model: str) -> None:
    aborted = SEEN.get(f"{model}_aborted", 0)
    response, elapsed = _post(gateway_url, model, stream=True)
    assert response.status_code == 200 and 3.0 <= elapsed < 12, elapsed
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert orjson.loads(events[-2])["error"]["code"] == "request_deadline"
    assert len(events) > 3  # what came before the deadline was relayed
    if model == "drip":
        _wait(lambda: SEEN["drip_aborted"] == aborted + 1, 5)


def test_a_client_that_stops_reading_has_its_stream_cut(gateway_url: str) -> None:
    before, aborted = _kind(gateway_url, "client_too_slow"), SEEN["flood_aborted"]
    port = int(gateway_url.rsplit(":", 1)[1])
    body = orjson.dumps({"model": "flood", "messages": [{"role": "user", "content": "hi"}], "stream": True})
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fill the pipe sooner
    try:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: g\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        # Never read. The gateway's writes block once the socket buffers are full; one second later it gives up.
        _wait(lambda: SEEN["flood_aborted"] == aborted + 1, 20)
        _wait(lambda: _kind(gateway_url, "client_too_slow") == before + 1, 5)
    finally:
        sock.close()
    ok, _ = _post(gateway_url, "ok", stream=True)  # the gateway serves others as before
    assert ok.status_code == 200 and ok.text.rstrip().endswith("data: [DONE]")


def test_the_request_deadline_holds_when_timers_are_armed_only_near_it() -> None:
    """With a read timeout (1 s) shorter than the request deadline (3 s), the relay arms no timer for
    most reads (the read timeout would wake a silent stream first) and checks the deadline as reads
    arrive; the endless drip (a chunk every 0.2 s) is still cut at 3 s."""
    upstream_port, gateway_port = free_port(), free_port()
    settings = Settings(upstream_urls=[f"http://127.0.0.1:{upstream_port}"], read_timeout_s=1.0,
                        first_byte_timeout_s=1.0, request_timeout_s=3.0,
                        models=[ModelConfig(name="drip", default_variant="none")])
    with ThreadedServer(fault_app(), upstream_port), ThreadedServer(build_app(settings), gateway_port):
        response, elapsed = _post(f"http://127.0.0.1:{gateway_port}", "drip", stream=True)
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and orjson.loads(events[-2])["error"]["code"] == "request_deadline"
    assert 3.0 <= elapsed < 6, elapsed
