"""The vLLM upstreams: one shared aiohttp session, round-robin over healthy servers, health checks.

The one place where transport failures become gateway errors: `UpstreamPool.open` and the
`UpstreamResponse` it yields raise only `gateway.errors` types (unavailable, overloaded, timeout,
rejected, failed, disconnected), never aiohttp's, so callers handle one error family. The sessions
are made in `start()` (the app's lifespan, inside the running event loop) and closed in `stop()`;
tests point the pool at a server on loopback. Knows nothing about chat semantics: it sends JSON
bodies and returns JSON answers or SSE events as bytes arrive.

aiohttp rather than httpx: httpcore's pool scanned every connection on each request, 1 ms of CPU a
request at concurrency 1 and 3.5 ms at 32, 46% of the gateway's CPU (docs/performance.md, section 2).

Failure handling:
- A connection that fails before any response byte ejects that upstream and the request goes to
  the next one; so do `Ejection.after_5xx` consecutive 5xx answers, unless no other upstream is
  healthy (5xx can follow from what a client sends; they never take the last upstream out). An
  ejected upstream stays out for a cooldown that doubles with each ejection in a row
  (`Ejection.base_s` up to `max_s`), even if its health probe answers in the meantime, so a
  flapping or crash-looping vLLM is not hammered; after the cooldown a successful probe brings it
  back, and a successful answer resets the count.
- Health probes use their own small session, so a request pool saturated by slow clients can
  neither delay them nor make them fail.
- No connection free in the request pool within the connect timeout is local overload: 503
  `overloaded` with Retry-After, and vLLM stays marked healthy. The pool's connections are counted
  here (`UpstreamPool._free`) as well as by aiohttp's connector, because aiohttp reports a wait for a
  free connection and a connect timeout with the same exception, and only the second is vLLM's fault.
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
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
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
from gateway.watchdog import StallWatchdog

logger = logging.getLogger("gateway.upstream")

# Errors raised before any response byte arrived, when the server closed a pooled keep-alive
# connection just as it was reused, refused the connection or did not accept it in time, or the
# connection broke while the request was written: safe to retry on another upstream.
# (ClientOSError covers ClientConnectorError, a refused or unresolvable connection.)
RETRYABLE = (
    aiohttp.ClientOSError,
    aiohttp.ClientConnectionResetError,
    aiohttp.ServerDisconnectedError,
    aiohttp.ConnectionTimeoutError,
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
    connect_timeout_s: float  # to connect, and to wait for a free connection in the pool
    read_timeout_s: float  # longest silence allowed between two bytes from vLLM, once the request is sent
    api_key: str | None = None
    max_connections: int = 512  # to all upstreams together; more requests wait (connect_timeout_s), then 503
    # Below uvicorn's and vLLM's 5 s keep-alive, so the client never reuses a connection the
    # server is closing.
    keepalive_s: float = 4.0


def build_session(
    config: ClientConfig, *, max_connections: int, timeout: aiohttp.ClientTimeout
) -> aiohttp.ClientSession:
    """A session to vLLM; made inside the running event loop (the app's lifespan), closed with it.

    No cookie jar: vLLM sets no cookies, and a proxy must not carry one client's into another's
    request. Proxy variables in the environment are not read (aiohttp's default, `trust_env=False`):
    vLLM is reached directly."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=max_connections, limit_per_host=0, keepalive_timeout=config.keepalive_s),
        timeout=timeout,
        headers={"Authorization": f"Bearer {config.api_key}"} if config.api_key else None,
        cookie_jar=aiohttp.DummyCookieJar(),
    )


def _read_failure(exc: BaseException, *, timeout_message: str, dropped_message: str) -> Exception:
    """The gateway error for a failure while reading an answer's body: a silence longer than the
    read timeout, or a connection that broke or closed before the body's end."""
    if isinstance(exc, TimeoutError):  # aiohttp's SocketTimeoutError is one
        return UpstreamTimeout(timeout_message)
    return UpstreamDisconnected(dropped_message)


def _too_large(max_bytes: int) -> str:
    return (
        f"the answer is larger than this gateway relays ({max_bytes} bytes); ask for fewer choices, "
        "tokens or logprobs, or stream it"
    )


class SilentReadStop:
    """A stream's `StallWatchdog` action: ends the pending read the way aiohttp's sock_read would
    (the read raises SocketTimeoutError), unless bytes came in since it began (`received_before`,
    the reader's `total_bytes` then): they can arrive in the same loop turn as the timer, before
    the reading task runs."""

    def __init__(self, content: aiohttp.StreamReader) -> None:
        self.content = content
        self.received_before = 0

    def __call__(self) -> bool:
        if self.content.total_bytes != self.received_before or self.content.is_eof():
            return False
        self.content.set_exception(aiohttp.SocketTimeoutError())
        return True


class UpstreamResponse:
    """An upstream answer whose headers arrived (status < 400) and whose body is still unread.

    `waited_s` is the time spent waiting on vLLM so far: until the headers, plus every body read.
    `silence_s`: the longest wait for a stream's next bytes, bounded by a `StallWatchdog` in
    `event_batches`; None when aiohttp's own read timeout bounds every read (whole answers).
    """

    def __init__(self, response: aiohttp.ClientResponse, waited_s: float, *, silence_s: float | None = None) -> None:
        self._response = response
        self.waited_s = waited_s
        self.silence_s = silence_s

    async def read_json(self, *, max_bytes: int) -> dict[str, Any]:
        """The whole answer as a JSON object (a non-streaming completion).

        An answer larger than `max_bytes` raises UpstreamResponseTooLarge as soon as it is known to
        be (its declared length, or the bytes read so far): it is never held whole in memory."""
        if self.silence_s is not None:  # its connection has no read timeout: only event_batches bounds it
            raise RuntimeError("an answer opened as a stream is read with event_batches")
        declared = self._response.content_length
        if declared is not None and declared > max_bytes:
            raise UpstreamResponseTooLarge(_too_large(max_bytes))
        content = self._response.content
        started = time.perf_counter()
        chunks: list[bytes] = []
        size = 0
        try:
            while chunk := await content.readany():
                size += len(chunk)
                if size > max_bytes:
                    raise UpstreamResponseTooLarge(_too_large(max_bytes))
                chunks.append(chunk)
        except (aiohttp.ClientError, OSError) as exc:
            raise _read_failure(
                exc,
                timeout_message="vLLM did not finish the answer in time",
                dropped_message="vLLM closed the connection before the answer was complete",
            ) from None
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
        wait longer than the read timeout for the next bytes UpstreamTimeout.
        """
        parser = EventParser()
        content = self._response.content
        loop = asyncio.get_running_loop()
        stop = SilentReadStop(content)
        watchdog = StallWatchdog(self.silence_s, stop) if self.silence_s is not None else None
        try:
            while not parser.done:
                started = loop.time()
                if watchdog is not None:
                    watchdog.pending_since = started
                    stop.received_before = content.total_bytes
                try:
                    data = await content.readany()  # all that has arrived; b"" at the end of the body
                except (aiohttp.ClientError, OSError) as exc:
                    raise _read_failure(
                        exc,
                        timeout_message="vLLM stopped sending in the middle of the answer",
                        dropped_message="vLLM dropped the connection in the middle of the answer",
                    ) from None
                finally:
                    self.waited_s += loop.time() - started
                    if watchdog is not None:
                        watchdog.pending_since = None
                events = parser.feed(data) if data else parser.close()
                if events:
                    yield events
        except IncompleteStream:
            raise UpstreamDisconnected("vLLM ended the stream before it was complete") from None
        finally:
            if watchdog is not None:
                watchdog.stop()


class UpstreamPool:
    def __init__(
        self,
        urls: list[str],
        config: ClientConfig,
        *,
        health_interval_s: float,
        ejection: Ejection = Ejection(),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.upstreams = [Upstream(url) for url in urls]
        self.health_interval_s = health_interval_s
        self.ejection = ejection
        self._clock = clock  # for ejection cooldowns (injected by tests)
        self._config = config
        self._session: aiohttp.ClientSession | None = None
        self._health_session: aiohttp.ClientSession | None = None
        self._free: asyncio.Semaphore | None = None  # connections left in the request pool
        self._next = 0
        self._task: asyncio.Task[None] | None = None
        self._probe: asyncio.Task[None] | None = None
        self._probed_at = 0.0

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("the upstream pool is not started (the app's lifespan starts it)")
        return self._session

    # --- lifecycle and health ------------------------------------------------------------------
    async def start(self) -> None:
        config = self._config
        self._session = build_session(
            config,
            max_connections=config.max_connections,
            # No total: a stream may last as long as its deadlines allow (gateway.deadlines).
            timeout=aiohttp.ClientTimeout(
                total=None, connect=config.connect_timeout_s, sock_read=config.read_timeout_s
            ),
        )
        self._health_session = build_session(
            config, max_connections=4 * len(self.upstreams), timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)
        )
        self._free = asyncio.Semaphore(config.max_connections)
        await self.check_health()
        self._task = asyncio.create_task(self._health_loop(), name="upstream-health")

    async def stop(self) -> None:
        for task in (self._task, self._probe):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        for session in (self._session, self._health_session):
            if session is not None:
                await session.close()
        self._session = self._health_session = None

    async def check_health(self) -> None:
        session = self._health_session
        if session is None:
            raise RuntimeError("the upstream pool is not started (the app's lifespan starts it)")
        self._probed_at = time.monotonic()

        async def probe(upstream: Upstream) -> None:
            try:
                async with session.get(f"{upstream.url}/health", allow_redirects=False) as response:
                    status = response.status
            except (aiohttp.ClientError, OSError) as exc:  # OSError: TimeoutError, PROBE_TIMEOUT_S passed
                upstream.healthy = False
                upstream.last_error = type(exc).__name__
                return
            if status != 200:
                upstream.healthy = False
                upstream.last_error = f"/health {status}"
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
    async def _connection(self) -> AsyncIterator[None]:
        """A connection of the request pool is ours until exit; GatewayOverloaded when none is
        free within the connect timeout."""
        free = self._free
        if free is None:
            raise RuntimeError("the upstream pool is not started (the app's lifespan starts it)")
        if free.locked():
            timer = asyncio.timeout(self._config.connect_timeout_s)
            try:
                async with timer:
                    await free.acquire()
            except TimeoutError:
                if not timer.expired():
                    raise
                raise GatewayOverloaded(
                    "the gateway has no free connection to vLLM (too many requests in flight); retry shortly"
                ) from None
        else:
            await free.acquire()  # at once: no timer to arm
        try:
            yield
        finally:
            free.release()

    @contextlib.asynccontextmanager
    async def open(
        self, path: str, body: dict[str, Any], headers: dict[str, str], *, stream: bool = False
    ) -> AsyncIterator[UpstreamResponse]:
        """POST `body` and yield the answer once its headers arrived, body unread.

        Tries each candidate upstream once for failures that happen before any response byte;
        the response is released on exit: its connection goes back to the pool when the body was
        read to the end, and is closed otherwise (closing a stream makes vLLM abort the request).
        Raises UpstreamUnavailable, GatewayOverloaded, UpstreamTimeout, UpstreamRejected (4xx) or
        UpstreamFailed. `stream`: the answer will be read with `event_batches`, whose reads are
        bounded by one watchdog instead of aiohttp's read timeout (which bounds the wait for the headers).
        """
        payload = orjson.dumps(body)
        request_headers = {"Content-Type": "application/json", **headers}
        candidates = await self._candidates()
        session = self.session
        last_error: Exception | None = None
        async with self._connection():
            for upstream in candidates:
                started = time.perf_counter()
                try:
                    response = await session.post(
                        f"{upstream.url}{path}", data=payload, headers=request_headers, allow_redirects=False
                    )
                except aiohttp.SocketTimeoutError:  # read timeout while waiting for the headers
                    raise UpstreamTimeout(f"vLLM at {upstream.url} did not answer in time") from None
                except RETRYABLE as exc:
                    self.eject(upstream, type(exc).__name__)
                    last_error = exc
                    logger.warning(
                        "upstream %s failed before answering (%s); trying the next one",
                        upstream.url,
                        type(exc).__name__,
                    )
                    continue
                except (aiohttp.ClientError, OSError) as exc:
                    raise UpstreamFailed(f"request to vLLM failed: {type(exc).__name__}") from None
                waited_s = time.perf_counter() - started
                self._answered(upstream, response.status)
                try:
                    if response.status >= 400:
                        await raise_for_upstream_status(response)
                    silence_s = None
                    if stream and (connection := response.connection) and connection.protocol is not None:
                        # From the headers on, one StallWatchdog bounds the stream's reads
                        # (UpstreamResponse.event_batches): aiohttp's sock_read would cancel and re-arm
                        # a timer on every read. (aiohttp does the same for a websocket's reads.)
                        connection.protocol.read_timeout = None
                        silence_s = self._config.read_timeout_s
                    yield UpstreamResponse(response, waited_s, silence_s=silence_s)
                finally:
                    response.release()
                return
        raise UpstreamUnavailable(
            f"no vLLM upstream is reachable ({type(last_error).__name__ if last_error else 'none healthy'})",
            retry_after_s=math.ceil(self.health_interval_s),
        )


async def raise_for_upstream_status(response: aiohttp.ClientResponse) -> None:
    """Turn a vLLM error response into the gateway error that passes its status and message on."""
    try:
        body = orjson.loads(await response.read())
    except (orjson.JSONDecodeError, aiohttp.ClientError, OSError):
        body = {}
    if not isinstance(body, dict):
        body = {}
    error: dict[str, Any] = body["error"] if isinstance(body.get("error"), dict) else body
    message = str(error.get("message") or f"vLLM answered HTTP {response.status}")
    if 400 <= response.status < 500:
        raise UpstreamRejected(
            message,
            status_code=response.status,
            param=error.get("param"),
            code=error.get("code") if isinstance(error.get("code"), str) else None,
            error_type=error.get("type") if isinstance(error.get("type"), str) else None,
        )
    raise UpstreamFailed(f"vLLM failed with HTTP {response.status}: {message}")
