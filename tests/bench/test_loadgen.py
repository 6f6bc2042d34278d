"""The gateway benchmarks' load generator against their instant upstream, over real loopback HTTP."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import httpx
import pytest

from bench.loadgen import percentile, run_load
from stack.processes import ManagedProcess, free_port

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory):
    port = free_port()
    proc = ManagedProcess(name="instant", command=[sys.executable, str(REPO / "bench" / "instant_upstream.py"),
                                                   "--port", str(port)],
                          log_path=tmp_path_factory.mktemp("logs") / "upstream.log").start()
    try:
        proc.wait_http_ok(f"http://127.0.0.1:{port}/health", 30, port=port)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stop()


def _load(url: str, body: dict, **kwargs):
    return asyncio.run(run_load(url, body, **kwargs))


def test_answers_are_counted_and_timed(upstream: str) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    result = _load(f"{upstream}/v1/chat/completions", body, concurrency=4, requests=40)
    assert (len(result.latencies_s), result.errors, result.chunks) == (40, [], 0)
    assert all(latency > 0 for latency in result.latencies_s) and result.wall_s > 0


def test_streams_are_read_to_done_with_their_chunks_and_first_token(upstream: str) -> None:
    body = {"model": "m", "messages": [], "max_tokens": 7, "stream": True, "stream_options": {"include_usage": True}}
    result = _load(f"{upstream}/v1/chat/completions", body, concurrency=3, requests=9)
    assert (len(result.latencies_s), result.errors) == (9, [])
    assert result.chunks == 9 * (1 + 7 + 1 + 1)  # role chunk, 7 tokens, usage chunk, [DONE]
    assert len(result.first_token_s) == 9
    # The same stream as the official client reads it: what the generator counts is what is there.
    with httpx.stream("POST", f"{upstream}/v1/chat/completions", json=body) as response:
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert len(events) == 10 and events[-1] == "data: [DONE]"


def test_a_non_200_answer_is_an_error_not_a_latency(upstream: str) -> None:
    result = _load(f"{upstream}/v1/nothing", {"model": "m"}, concurrency=2, requests=4)
    assert result.latencies_s == [] and len(result.errors) == 4 and result.errors[0].startswith("404")


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 50), percentile(values, 99), percentile(values, 100)) == (50.0, 99.0, 100.0)
    assert percentile([3.0], 95) == 3.0


def test_a_paced_upstream_writes_the_same_stream_one_event_at_a_time(tmp_path: Path, upstream: str) -> None:
    port = free_port()
    proc = ManagedProcess(name="paced", command=[sys.executable, str(REPO / "bench" / "instant_upstream.py"),
                                                 "--port", str(port), "--pace-ms", "20"],
                          log_path=tmp_path / "paced.log").start()
    try:
        proc.wait_http_ok(f"http://127.0.0.1:{port}/health", 30, port=port)
        body = {"model": "m", "messages": [], "max_tokens": 7, "stream": True}
        with httpx.stream("POST", f"{upstream}/v1/chat/completions", json=body) as response:
            at_once = [line for line in response.iter_lines() if line.startswith("data: ")]
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body) as response:
            pieces = [piece for piece in response.iter_raw()]
        paced = [line for line in b"".join(pieces).decode().splitlines() if line.startswith("data: ")]
        assert len(paced) == len(at_once) == 9  # role chunk, 7 tokens, [DONE]

        def timeless(line: str) -> object:  # `created` is the second each answer was made
            return line if line == "data: [DONE]" else {**json.loads(line[6:]), "created": 0}

        assert [timeless(line) for line in paced] == [timeless(line) for line in at_once]
        assert len(pieces) >= 5  # the events came in separate reads, not in one
    finally:
        proc.stop()
