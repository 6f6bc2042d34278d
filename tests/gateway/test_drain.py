"""Graceful shutdown: the real gateway process (python -m gateway) gets SIGTERM while a stream is in
flight. It stops accepting connections at once, lets the stream finish whole within --drain-timeout,
and exits (uvicorn re-raises the SIGTERM once drained, so the exit status is SIGTERM's); a stream longer than the drain timeout is cut when it ends, its vLLM request closed.
The upstream is the fault app of tests/gateway/fault_upstream.py ("slow": ten chunks over 2 s;
"drip": endless)."""

from __future__ import annotations

import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from stack.processes import free_port, start_gateway
from tests.gateway.fault_upstream import SEEN, ThreadedServer, fault_app

pytestmark = pytest.mark.slow
# After a drain uvicorn exits by re-raising the signal it caught (or 0 on older versions).
EXITED = (0, -signal.SIGTERM)


@pytest.fixture(scope="module")
def upstream_url():
    port = free_port()
    with ThreadedServer(fault_app(), port):
        yield f"http://127.0.0.1:{port}"


def _gateway(tmp_path: Path, upstream_url: str, drain_s: float):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"upstream_urls": [upstream_url],
                                      "models": [{"name": n, "default_variant": "none"} for n in ("slow", "drip")]}))
    port = free_port()
    process = start_gateway(config, port=port, log_path=tmp_path / "gateway.log", extra_args=("--drain-timeout",
                                                                                                str(drain_s)))
    return process, port


def _stream_in_thread(port: int, model: str, out: dict) -> threading.Thread:
    def run() -> None:
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", timeout=30,
                          json={"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True}) as r:
            out["status"] = r.status_code
            out["lines"] = []
            try:
                for line in r.iter_lines():
                    out["lines"].append(line)
                    out.setdefault("first_at", time.monotonic())
            except httpx.HTTPError as exc:
                out["error"] = type(exc).__name__

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _wait(predicate, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_sigterm_lets_a_stream_in_flight_finish_and_refuses_new_connections(request, tmp_path, upstream_url) -> None:
    process, port = _gateway(tmp_path, upstream_url, drain_s=20)
    request.addfinalizer(process.stop)
    out: dict = {}
    thread = _stream_in_thread(port, "slow", out)
    _wait(lambda: "first_at" in out, 10)
    process.process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    with pytest.raises(OSError):  # no longer accepting
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    thread.join(timeout=20)
    data = [line for line in out["lines"] if line.startswith("data: ")]
    assert out["status"] == 200 and data[-1] == "data: [DONE]" and "error" not in out
    assert sum('"content"' in line for line in data) == 10  # all ten chunks, none lost to the shutdown
    assert process.process.wait(timeout=20) in EXITED


def test_a_stream_longer_than_the_drain_timeout_is_cut_and_its_upstream_closed(request, tmp_path, upstream_url) -> None:
    process, port = _gateway(tmp_path, upstream_url, drain_s=1)
    request.addfinalizer(process.stop)
    aborted = SEEN["drip_aborted"]
    out: dict = {}
    thread = _stream_in_thread(port, "drip", out)
    _wait(lambda: "first_at" in out, 10)
    signalled = time.monotonic()
    process.process.send_signal(signal.SIGTERM)
    assert process.process.wait(timeout=20) in EXITED
    exited_after = time.monotonic() - signalled
    thread.join(timeout=10)
    assert 1.0 <= exited_after < 10, exited_after
    _wait(lambda: SEEN["drip_aborted"] == aborted + 1, 5)  # vLLM's request was closed, not left running
