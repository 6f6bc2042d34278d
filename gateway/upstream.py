"""The vLLM upstreams: one shared httpx client, round-robin over healthy servers, health checks.

The one place where transport failures become gateway errors: `UpstreamPool.open` and the
`UpstreamResponse` it yields raise only `gateway.errors` types (unavailable, overloaded, timeout,
rejected, failed, disconnected), never httpx's, so callers handle one error family. The clients are
made in `start()` (the app's lifespan) and closed in `stop()`; tests hand in an httpx transport.
Knows nothing about chat semantics: it sends JSON bodies and returns JSON answers or SSE events.

Failure handling:
- A connection that fails before any response byte ejects that upstream and the request goes to
  the next one; so do `Ejection.after_5xx` consecutive 5xx answers, unless no other upstream is
  healthy (5xx can follow from what a client sends; they never take the last upstream out). An
  ejected upstream stays out for a cooldown that doubles with each ejection in a row
  (`Ejection.base_s` up to `max_s`), even if its health probe answers in the meantime, so a
  flapping or crash-looping vLLM is not hammered; after the cooldown a successful probe brings it
  back, and a successful answer resets the count.
- Health probes use their own small client, so a request pool saturated by slow clients can
  neither delay them nor make them fail.
- No connection free in the request pool within the connect timeout is local overload: 503
  `overloaded` with Retry-After, and vLLM stays marked healthy.
- With no upstream known healthy, a request triggers one immediate probe round (shared by all
  requests waiting, at most one a second) and, if none answers, gets a fast 503 with Retry-After
  instead of waiting on dead or hung servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from gateway.errors import (
    GatewayOverloaded,
    UpstreamDisconnected,
    UpstreamFailed,
    UpstreamRejected,
    UpstreamResponseTooLarge,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.sse import EventParser, IncompleteStream

logger = logging.getLogger("gateway.upstream")

# Errors raised before any response byte arrived, when the server closed a pooled keep-alive
# connection just as it was reused (or refused the connection): safe to retry on another upstream.
RETRYABLE = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.RemoteProtocolError,
    httpx.ReadError,
    httpx.WriteError,
)
PROBE_TIMEOUT_S = 2.0
MIN_REPROBE_S = 1.0  # a request finding no healthy upstream probes again at most this often


@dataclass
class Upstream:
    url: str
    healthy: bool = False
    last_error: str | None = None
    ejected_until: float = 0.0  # on the pool's clock: probes do not bring it back before
    ejections: int = 0  # in a row, without a successful answer between them
    failures_5xx: int = 0  # consecutive 5xx answers


@dataclass(frozen=True)
class Ejection:
    """When a failing upstream is taken out, and for how long (settings: eject_*)."""

    base_s: float = 1.0
    max_s: float = 30.0
    after_5xx: int = 5

    def cooldown_s(self, ejections: int) -> float:
        return min(self.max_s, self.base_s * 2 ** max(0, ejections - 1))


@dataclass(frozen=True)
class ClientConfig:
    connect_timeout_s: float
    read_timeout_s: float  # longest silence allowed between two bytes from vLLM
    api_key: str | None = None


def build_client(config: ClientConfig, transport: httpx.AsyncBaseTransport | None = None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    return httpx.AsyncClient(
        timeout=httpx.Timeout(
            connect=config.connect_timeout_s, read=config.read_timeout_s, write=30.0, pool=config.connect_timeout_s
        ),
        # Below uvicorn's and vLLM's 5 s keep-alive, so the client never reuses a connection the
        # server is closing.
        limits=httpx.Limits(max_connections=512, max_keepalive_connections=64, keepalive_expiry=4.0),
        headers=headers,
        transport=transport,
    )


@contextlib.contextmanager
def _reading(*, timeout_message: str, dropped_message: str) -> Iterator[None]:
    """Translate a failure while reading an answer's body into the gateway's errors."""
    try:
        yield
    except httpx.TimeoutException:
        raise UpstreamTimeout(timeout_message) from None
    except httpx.HTTPError:
        raise UpstreamDisconnected(dropped_message) from None


def _too_large(max_bytes: int) -> str:
    return (
        f"the answer is larger than this gateway relays ({max_bytes} bytes); ask for fewer choices, "
        "tokens or logprobs, or stream it"
    )


class UpstreamResponse:
    """An upstream answer whose headers arrived (status < 400) and whose body is still unread.

    `waited_s` is the time spent waiting on vLLM so far: until the headers, plus every body read.
    """

    def __init__(self, response: httpx.Response, waited_s: float) -> None:
        self._response = response
        self.waited_s = waited_s

    async def read_json(self, *, max_bytes: int) -> dict[str, Any]:
        """The whole answer as a JSON object (a non-streaming completion).

        An answer larger than `max_bytes` raises UpstreamResponseTooLarge as soon as it is known to
        be (its declared length, or the bytes read so far): it is never held whole in memory."""
        declared = self._response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_bytes:
            raise UpstreamResponseTooLarge(_too_large(max_bytes))
        started = time.perf_counter()
        chunks: list[bytes] = []
        size = 0
        try:
            with _reading(
                timeout_message="vLLM did not finish the answer in time",
                dropped_message="vLLM closed the connection before the answer was complete",
            ):
                async for chunk in self._response.aiter_bytes():
                    size += len(chunk)
                    if size > max_bytes:
                        raise UpstreamResponseTooLarge(_too_large(max_bytes))
                    chunks.append(chunk)
        finally:
            self.waited_s += time.perf_counter() - started
        try:
            payload = orjson.loads(b"".join(chunks))
        except orjson.JSONDecodeError:
            raise UpstreamDisconnected("vLLM closed the connection before the answer was complete") from None
        if not isinstance(payload, dict):
            raise UpstreamFailed("vLLM answered something other than a JSON object")
        return payload

    async def event_batches(self) -> AsyncGenerator[list[dict[str, Any]], None]:
        """The answer's SSE events (a streaming completion) up to `[DONE]`, which is not yielded:
        one list per network read, so that what arrived together is relayed together.

        A stream that stops early or carries an unreadable event raises UpstreamDisconnected, a
        silence longer than the read timeout UpstreamTimeout.
        """
        parser = EventParser()
        reads = self._response.aiter_bytes()
        try:
            while not parser.done:
                started = time.perf_counter()
                try:
                    with _reading(
                        timeout_message="vLLM stopped sending in the middle of the answer",
                        dropped_message="vLLM dropped the connection in the middle of the answer",
                    ):
                        data = await anext(reads)
                except StopAsyncIteration:
                    events = parser.close()
                else:
                    events = parser.feed(data)
                finally:
                    self.waited_s += time.perf_counter() - started
                if events:
                    yield events
        except IncompleteStream:
            raise UpstreamDisconnected("vLLM ended the stream before it was complete") from None


class UpstreamPool:
    def __init__(
        self,
        urls: list[str],
        config: ClientConfig,
        *,
        health_interval_s: float,
        transport: httpx.AsyncBaseTransport | None = None,
        ejection: Ejection = Ejection(),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.upstreams = [Upstream(url) for url in urls]
        self.health_interval_s = health_interval_s
        self.ejection = ejection
        self._clock = clock  # for ejection cooldowns (injected by tests)
        self._config = config
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._health_client: httpx.AsyncClient | None = None
        self._next = 0
        self._task: asyncio.Task[None] | None = None
        self._probe: asyncio.Task[None] | None = None
        self._probed_at = 0.0

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            raise RuntimeError("the upstream pool is not started (the app's lifespan starts it)")
        return self._client

    # --- lifecycle and health ------------------------------------------------------------------
    async def start(self) -> None:
        self._client = build_client(self._config, self._transport)
        self._health_client = httpx.AsyncClient(
            timeout=PROBE_TIMEOUT_S,
            limits=httpx.Limits(max_connections=4 * len(self.upstreams)),
            headers=self._client.headers,
            transport=self._transport,
        )
        await self.check_health()
        self._task = asyncio.create_task(self._health_loop(), name="upstream-health")

    async def stop(self) -> None:
        for task in (self._task, self._probe):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        for client in (self._client, self._health_client):
            if client is not None:
                await client.aclose()
        self._client = self._health_client = None

    async def check_health(self) -> None:
        client = self._health_client
        if client is None:
            raise RuntimeError("the upstream pool is not started (the app's lifespan starts it)")
        self._probed_at = time.monotonic()

        async def probe(upstream: Upstream) -> None:
            try:
                response = await client.get(f"{upstream.url}/health")
            except httpx.HTTPError as exc:
                upstream.healthy = False
                upstream.last_error = type(exc).__name__
                return
            if response.status_code != 200:
                upstream.healthy = False
                upstream.last_error = f"/health {response.status_code}"
            elif self._clock() >= upstream.ejected_until:
                upstream.healthy = True
                upstream.last_error = None
            # else: it answers, but its cooldown is not over; it stays out, last_error says why

        await asyncio.gather(*(probe(upstream) for upstream in self.upstreams))

    def eject(self, upstream: Upstream, reason: str) -> None:
        """Take `upstream` out for its cooldown (doubling with each ejection in a row)."""
        upstream.ejections += 1
        cooldown = self.ejection.cooldown_s(upstream.ejections)
        upstream.ejected_until = self._clock() + cooldown
        upstream.healthy = False
        upstream.failures_5xx = 0
        upstream.last_error = f"{reason} (ejected for {cooldown:g} s)"
        logger.warning("upstream %s ejected for %g s: %s", upstream.url, cooldown, reason)

    def _answered(self, upstream: Upstream, status: int) -> None:
        """Count an answer: consecutive 5xx eject it, unless it is the last healthy upstream (a
        client whose requests make vLLM fail must not take the whole service out); anything else
        resets the counts."""
        if status >= 500:
            upstream.failures_5xx += 1
            others = any(other.healthy for other in self.upstreams if other is not upstream)
            if upstream.failures_5xx >= self.ejection.after_5xx and others:
                self.eject(upstream, f"{upstream.failures_5xx} answers with HTTP 5xx in a row")
        else:
            upstream.failures_5xx = 0
            upstream.ejections = 0

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            with contextlib.suppress(Exception):
                await self.check_health()

    @property
    def any_healthy(self) -> bool:
        return any(upstream.healthy for upstream in self.upstreams)

    def _healthy(self) -> list[Upstream]:
        """Healthy upstreams in round-robin order."""
        count = len(self.upstreams)
        start = self._next % count
        self._next += 1
        ordered = [self.upstreams[(start + offset) % count] for offset in range(count)]
        return [upstream for upstream in ordered if upstream.healthy]

    async def _candidates(self) -> list[Upstream]:
        """Healthy upstreams in round-robin order, after one shared re-probe when none is known
        healthy; UpstreamUnavailable (fast, with Retry-After) when still none is."""
        healthy = self._healthy()
        if healthy:
            return healthy
        if self._probe is None or self._probe.done():
            if time.monotonic() - self._probed_at >= MIN_REPROBE_S:
                self._probe = asyncio.create_task(self.check_health(), name="upstream-reprobe")
        if self._probe is not None and not self._probe.done():
            with contextlib.suppress(Exception):
                await asyncio.shield(self._probe)
        healthy = self._healthy()
        if healthy:
            return healthy
        raise UpstreamUnavailable(
            "no vLLM upstream is healthy: " + "; ".join(f"{u.url}: {u.last_error}" for u in self.upstreams),
            retry_after_s=math.ceil(self.health_interval_s),
        )

    # --- requests ------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def open(self, path: str, body: dict[str, Any], headers: dict[str, str]) -> AsyncIterator[UpstreamResponse]:
        """POST `body` and yield the answer once its headers arrived, body unread.

        Tries each candidate upstream once for failures that happen before any response byte;
        the response is closed on exit (closing a stream makes vLLM abort the request).
        Raises UpstreamUnavailable, UpstreamTimeout, UpstreamRejected (4xx) or UpstreamFailed.
        """
        payload = orjson.dumps(body)
        last_error: Exception | None = None
        for upstream in await self._candidates():
            request = self.client.build_request(
                "POST",
                f"{upstream.url}{path}",
                content=payload,
                headers={"Content-Type": "application/json", **headers},
            )
            started = time.perf_counter()
            try:
                response = await self.client.send(request, stream=True)
            except httpx.ReadTimeout:
                raise UpstreamTimeout(f"vLLM at {upstream.url} did not answer in time") from None
            except httpx.PoolTimeout:
                raise GatewayOverloaded(
                    "the gateway has no free connection to vLLM (too many requests in flight); retry shortly"
                ) from None
            except RETRYABLE as exc:
                self.eject(upstream, type(exc).__name__)
                last_error = exc
                logger.warning(
                    "upstream %s failed before answering (%s); trying the next one", upstream.url, type(exc).__name__
                )
                continue
            except httpx.HTTPError as exc:
                raise UpstreamFailed(f"request to vLLM failed: {type(exc).__name__}") from None
            waited_s = time.perf_counter() - started
            self._answered(upstream, response.status_code)
            try:
                if response.status_code >= 400:
                    await raise_for_upstream_status(response)
                yield UpstreamResponse(response, waited_s)
            finally:
                await response.aclose()
            return
        raise UpstreamUnavailable(
            f"no vLLM upstream is reachable ({type(last_error).__name__ if last_error else 'none healthy'})",
            retry_after_s=math.ceil(self.health_interval_s),
        )


async def raise_for_upstream_status(response: httpx.Response) -> None:
    """Turn a vLLM error response into the gateway error that passes its status and message on."""
    try:
        body = orjson.loads(await response.aread())
    except (orjson.JSONDecodeError, httpx.HTTPError):
        body = {}
    if not isinstance(body, dict):
        body = {}
    error: dict[str, Any] = body["error"] if isinstance(body.get("error"), dict) else body
    message = str(error.get("message") or f"vLLM answered HTTP {response.status_code}")
    if 400 <= response.status_code < 500:
        raise UpstreamRejected(
            message,
            status_code=response.status_code,
            param=error.get("param"),
            code=error.get("code") if isinstance(error.get("code"), str) else None,
            error_type=error.get("type") if isinstance(error.get("type"), str) else None,
        )
    raise UpstreamFailed(f"vLLM failed with HTTP {response.status_code}: {message}")
