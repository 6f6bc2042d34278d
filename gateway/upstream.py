"""The vLLM upstreams: one shared httpx client, round-robin over healthy servers, health checks,
and translation of transport failures into gateway errors.

Made once per app in the lifespan and injected (tests may hand in their own client). Knows
nothing about chat semantics: it sends JSON bodies and returns httpx responses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator

import httpx
import orjson

from gateway.errors import (
    UpstreamFailed,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)

logger = logging.getLogger("gateway.upstream")

# Errors raised before any response byte arrived, when the server closed a pooled keep-alive
# connection just as it was reused (or refused the connection): safe to retry on another upstream.
RETRYABLE = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError,
             httpx.WriteError, httpx.PoolTimeout)


@dataclass
class Upstream:
    url: str
    healthy: bool = False
    last_error: str | None = None


def build_client(*, connect_timeout_s: float, read_timeout_s: float, api_key: str | None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.AsyncClient(
        timeout=httpx.Timeout(connect=connect_timeout_s, read=read_timeout_s, write=30.0, pool=connect_timeout_s),
        # Below uvicorn's and vLLM's 5 s keep-alive, so the client never reuses a connection the
        # server is closing.
        limits=httpx.Limits(max_connections=512, max_keepalive_connections=64, keepalive_expiry=4.0),
        headers=headers,
    )


class UpstreamPool:
    def __init__(self, urls: list[str], client: httpx.AsyncClient, *, health_interval_s: float) -> None:
        self.upstreams = [Upstream(url) for url in urls]
        self.client = client
        self.health_interval_s = health_interval_s
        self._next = 0
        self._task: asyncio.Task[None] | None = None

    # --- health ------------------------------------------------------------------------------
    async def check_health(self) -> None:
        async def probe(upstream: Upstream) -> None:
            try:
                response = await self.client.get(f"{upstream.url}/health", timeout=2.0)
                upstream.healthy = response.status_code == 200
                upstream.last_error = None if upstream.healthy else f"/health {response.status_code}"
            except httpx.HTTPError as exc:
                upstream.healthy = False
                upstream.last_error = type(exc).__name__
        await asyncio.gather(*(probe(upstream) for upstream in self.upstreams))

    async def start(self) -> None:
        await self.check_health()
        self._task = asyncio.create_task(self._health_loop(), name="upstream-health")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            with contextlib.suppress(Exception):
                await self.check_health()

    @property
    def any_healthy(self) -> bool:
        return any(upstream.healthy for upstream in self.upstreams)

    def _candidates(self) -> list[Upstream]:
        """Healthy upstreams in round-robin order; all of them if none is known healthy."""
        count = len(self.upstreams)
        start = self._next % count
        self._next += 1
        ordered = [self.upstreams[(start + offset) % count] for offset in range(count)]
        healthy = [upstream for upstream in ordered if upstream.healthy]
        return healthy or ordered

    # --- requests ----------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def open(self, path: str, body: dict, headers: dict[str, str]) -> AsyncIterator[tuple[httpx.Response, float]]:
        """POST `body` and yield (response with unread body, seconds until its headers arrived).

        Tries each candidate upstream once for failures that happen before any response byte;
        the response is closed on exit (closing a stream makes vLLM abort the request).
        Raises UpstreamUnavailable, UpstreamTimeout, UpstreamRejected (4xx) or UpstreamFailed.
        """
        payload = orjson.dumps(body)
        last_error: Exception | None = None
        for upstream in self._candidates():
            request = self.client.build_request(
                "POST", f"{upstream.url}{path}", content=payload,
                headers={"Content-Type": "application/json", **headers})
            started = time.perf_counter()
            try:
                response = await self.client.send(request, stream=True)
            except httpx.ReadTimeout:
                raise UpstreamTimeout(f"vLLM at {upstream.url} did not answer in time") from None
            except RETRYABLE as exc:
                upstream.healthy = False
                upstream.last_error = type(exc).__name__
                last_error = exc
                logger.warning("upstream %s failed before answering (%s); trying the next one",
                               upstream.url, type(exc).__name__)
                continue
            except httpx.HTTPError as exc:
                raise UpstreamFailed(f"request to vLLM failed: {type(exc).__name__}") from None
            waited = time.perf_counter() - started
            try:
                if response.status_code >= 400:
                    await raise_for_upstream_status(response)
                yield response, waited
            finally:
                await response.aclose()
            return
        raise UpstreamUnavailable(
            f"no vLLM upstream is reachable ({type(last_error).__name__ if last_error else 'none healthy'})")


async def raise_for_upstream_status(response: httpx.Response) -> None:
    """Turn a vLLM error response into the gateway error that passes its status and message on."""
    try:
        body = orjson.loads(await response.aread())
    except (orjson.JSONDecodeError, httpx.HTTPError):
        body = {}
    error = body.get("error") if isinstance(body.get("error"), dict) else body
    message = str(error.get("message") or f"vLLM answered HTTP {response.status_code}")
    if 400 <= response.status_code < 500:
        raise UpstreamRejected(message, status_code=response.status_code, param=error.get("param"),
                               code=error.get("code") if isinstance(error.get("code"), str) else None,
                               error_type=error.get("type") if isinstance(error.get("type"), str) else None)
    raise UpstreamFailed(f"vLLM failed with HTTP {response.status_code}: {message}")

