"""Load against the real vLLM CPU server: 64 concurrent streams, 192 requests in all, through the real
gateway process (python -m gateway) with the official `openai` client's async API.

Every request must end whole (200, content, a finish reason), the gateway's counters must equal what
was sent (requests, judged answers, completion tokens as vLLM reported them), and the gateway's
resident memory must stay bounded; its figures are printed (docs/security.md quotes them). The
fault half of the proof (SIGKILL of vLLM under the same load) is tests/gateway/test_resilience.py,
run by `make test-resilience`.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import openai
import pytest

from tests.metrics_text import metric_total

pytestmark = pytest.mark.integration

CONCURRENCY = 64
REQUESTS = 192
MAX_TOKENS = 16


def rss_mib(pid: int) -> float:
    """Resident memory of a process and its children (uvicorn runs the app in the same process)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def one_stream(client: openai.AsyncOpenAI, index: int) -> tuple[str, str | None, int]:
    stream = await client.chat.completions.create(
        model="tiny@short", messages=[{"role": "user", "content": f"Question {index}: how do I bake bread?"}],
        max_tokens=MAX_TOKENS, temperature=0, stream=True, stream_options={"include_usage": True})
    text, finish, tokens = [], None, 0
    async for chunk in stream:
        if chunk.choices:
            text.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return "".join(text), finish, tokens


async def run_load(base_url: str) -> list[tuple[str, str | None, int]]:
    limit = asyncio.Semaphore(CONCURRENCY)
    http = httpx.AsyncClient(limits=httpx.Limits(max_connections=CONCURRENCY), timeout=300)
    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, http_client=http)

    async def limited(index: int):
        async with limit:
            return await one_stream(client, index)

    try:
        return await asyncio.gather(*(limited(i) for i in range(REQUESTS)))
    finally:
        await client.close()


def test_64_concurrent_streams_end_whole_and_are_counted_exactly(gateway) -> None:
    pid = gateway.process.pid
    scrape = lambda: httpx.get(f"{gateway.base_url}/metrics", timeout=10).text  # noqa: E731
    before = scrape()
    rss_before = rss_mib(pid)
    results = asyncio.run(run_load(gateway.base_url))
    rss_after = rss_mib(pid)
    after = scrape()

    assert len(results) == REQUESTS
    assert all(text and finish in ("stop", "length") for text, finish, _ in results)
    sent_tokens = sum(tokens for _, _, tokens in results)

    def delta(name: str, **labels: str) -> float:
        return metric_total(after, name, **labels) - metric_total(before, name, **labels)

    assert delta("dro_gateway_requests_total", variant="short", status="200") == REQUESTS
    assert delta("dro_gateway_requests_total") == REQUESTS  # nothing else, no error of any status
    assert delta("dro_gateway_request_errors_total") == 0
    assert delta("dro_gateway_answers_judged_total", variant="short") == REQUESTS
    assert delta("dro_gateway_completion_tokens_total", variant="short") == sent_tokens
    print(f"\n{REQUESTS} streams at concurrency {CONCURRENCY}: gateway RSS {rss_before:.0f} -> {rss_after:.0f} MiB, "
          f"{sent_tokens} completion tokens")
    assert rss_after < 400, f"gateway RSS {rss_after:.0f} MiB"
    assert rss_after - rss_before < 150, f"gateway RSS grew {rss_after - rss_before:.0f} MiB under load"


def status_lines(metrics: str) -> list[str]:
    return [line for line in metrics.splitlines()
            if line.startswith(("dro_gateway_requests_total{", "dro_gateway_request_errors_total{"))]


def test_clients_that_stop_reading_are_cut_while_others_are_served(gateway_factory, vllm_server) -> None:
    """Four clients ask for long streams (8 choices of 1,500 forced tokens with 20 logprobs each: tens
    of megabytes, so the socket buffers fill within seconds) and never read. Meanwhile /ready stays
    200 and another client's requests are answered; once their writes have waited
    client_write_timeout_s (2 s here), the four are cut, vLLM's requests end, and each is counted as
    `client_too_slow`."""
    import socket
    import time

    import orjson

    gateway = gateway_factory(client_write_timeout_s=2)
    before = httpx.get(f"{gateway.base_url}/metrics", timeout=10).text
    body = orjson.dumps({"model": "tiny@none", "messages": [{"role": "user", "content": "Tell me a story."}],
                         "max_tokens": 1500, "min_tokens": 1500, "n": 8, "logprobs": True, "top_logprobs": 20,
                         "temperature": 1.0, "stream": True})
    sockets = []
    for _ in range(4):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: a small window
        sock.connect(("127.0.0.1", gateway.port))
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: g\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        sockets.append(sock)
    try:
        client = gateway.openai_client()
        for _ in range(3):
            assert httpx.get(f"{gateway.base_url}/ready", timeout=10).status_code == 200
            reply = client.chat.completions.create(model="tiny@short", max_tokens=8, temperature=0,
                                                   messages=[{"role": "user", "content": "hi"}])
            assert reply.choices[0].message.content
        deadline = time.monotonic() + 120
        while True:
            metrics = httpx.get(f"{gateway.base_url}/metrics", timeout=10).text
            cut = (metric_total(metrics, "dro_gateway_request_errors_total", kind="client_too_slow")
                   - metric_total(before, "dro_gateway_request_errors_total", kind="client_too_slow"))
            rejected = (metric_total(metrics, "dro_gateway_request_errors_total", kind="upstream_4xx")
                        - metric_total(before, "dro_gateway_request_errors_total", kind="upstream_4xx"))
            assert rejected == 0, f"vLLM rejected the slow readers' requests; {status_lines(metrics)}"
            if cut == 4:
                break
            assert time.monotonic() < deadline, f"{cut} of 4 slow readers cut; {status_lines(metrics)}"
            time.sleep(0.5)
    finally:
        for sock in sockets:
            sock.close()
    deadline = time.monotonic() + 10  # vLLM's requests were closed with the streams: it aborts them
    while metric_total(httpx.get(f"{vllm_server.base_url}/metrics", timeout=10).text, "vllm:num_requests_running"):
        assert time.monotonic() < deadline, "vLLM still runs the cut requests"
        time.sleep(0.1)
