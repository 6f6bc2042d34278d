"""A closed-loop HTTP load generator for chat completions, cheap enough to share two cores with
what it measures (docs/performance.md).

`C` workers each hold one keep-alive HTTP/1.1 connection and send the same prepared request
again as soon as the previous answer has been read to its end, until `requests` answers are in.
Raw asyncio (uvloop when installed) rather than an HTTP library: on this machine httpx costs
1-3.5 ms of CPU a request (shared/reference/gateway-limits.md), which would be taken from the
process under test. It reads `content-length` and `chunked` bodies, and records per request the
latency to the last byte, the time to the first SSE `data:` event that carries content (streams)
and the status. A response that is not 200, or a stream that does not end with `[DONE]`, counts
as an error (kept, with its first bytes, for the report).
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import orjson

CONTENT = re.compile(rb'"content":\s?"[^"]')


@dataclass
class Result:
    latencies_s: list[float] = field(default_factory=list)
    first_token_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    chunks: int = 0  # SSE events received (streams)


class HttpError(Exception):
    pass


def build_request(url: str, body: dict, api_key: str | None = None) -> tuple[str, int, bytes]:
    """(host, port, the request's bytes) for a POST of `body` as JSON to `url`."""
    parts = urlsplit(url)
    payload = orjson.dumps(body)
    headers = [
        f"POST {parts.path} HTTP/1.1",
        f"host: {parts.hostname}:{parts.port}",
        "content-type: application/json",
        "accept: application/json, text/event-stream",
        f"content-length: {len(payload)}",
    ]
    if api_key:
        headers.append(f"authorization: Bearer {api_key}")
    head = ("\r\n".join(headers) + "\r\n\r\n").encode()
    return parts.hostname or "127.0.0.1", parts.port or 80, head + payload


async def _read_response(reader: asyncio.StreamReader, started: float,
                         stream: bool) -> tuple[int, float | None, int, bytes, bytes, bool]:
    """(status, first content event time, SSE events, body start, body end, keep-alive?)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, _, header_block = head.partition(b"\r\n")
    status = int(status_line.split(b" ", 2)[1])
    length: int | None = None
    chunked = False
    keep_alive = True
    for line in header_block.split(b"\r\n"):
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        value = value.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value:
            chunked = True
        elif name == b"connection" and value == b"close":
            keep_alive = False
    first: float | None = None
    events = 0
    if not chunked:
        body = await reader.readexactly(length) if length is not None else await reader.read()
        if length is None:
            keep_alive = False
        if stream:
            events = body.count(b"data: ")
            first = time.perf_counter() - started if CONTENT.search(body) else None
        return status, first, events, body[:400], body[-200:], keep_alive
    sample = b""
    tail = b""
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";", 1)[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")  # the empty trailer
            break
        data = await reader.readexactly(size + 2)
        if not sample:
            sample = data[:400]
        if first is None and CONTENT.search(data):
            first = time.perf_counter() - started
        events += data.count(b"data: ")
        tail = (tail + data[:-2])[-200:]
    return status, first, events, sample, tail, keep_alive


async def run_load(url: str, body: dict, *, concurrency: int, requests: int, api_key: str | None = None,
                   timeout_s: float = 120.0) -> Result:
    """Send `requests` copies of `body` to `url` from `concurrency` connections; wait for them all."""
    host, port, request = build_request(url, body, api_key)
    stream = bool(body.get("stream"))
    result = Result()
    remaining = requests

    async def worker() -> None:
        nonlocal remaining
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        while remaining > 0:
            remaining -= 1
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port, limit=1 << 22)
            assert reader is not None
            started = time.perf_counter()
            try:
                writer.write(request)
                status, first, events, sample, tail, keep_alive = await asyncio.wait_for(
                    _read_response(reader, started, stream), timeout_s)
            except (TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
                result.errors.append(f"{type(exc).__name__}: {exc}")
                writer.close()
                reader = writer = None
                continue
            elapsed = time.perf_counter() - started
            ok = status == 200 and (not stream or tail.rstrip().endswith(b"data: [DONE]"))
            if ok:
                result.latencies_s.append(elapsed)
                result.chunks += events
                if first is not None:
                    result.first_token_s.append(first)
            else:
                result.errors.append(f"{status}: {sample[:200]!r}")
            if not keep_alive:
                writer.close()
                reader = writer = None
        if writer is not None:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.wall_s = time.perf_counter() - started
    return result


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]
