"""The upstream pool (gateway/upstream.py) against scripted mock vLLMs over real HTTP on loopback
(tests/gateway/scripted_upstream.py): failover, ejection, the connection limit, the API key, closing
vLLM's request, and every transport failure raised as a gateway error, never as aiohttp's."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import pytest

from gateway import upstream as upstream_module
from gateway.errors import (
    GatewayOverloaded,
    UpstreamDisconnected,
    UpstreamFailed,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.upstream import ClientConfig, UpstreamPool
from tests.gateway.scripted_upstream import Handler, Received, Reply, ScriptedUpstream


@pytest.fixture
def running() -> Iterator[contextlib.ExitStack]:
    with contextlib.ExitStack() as stack:
        yield stack


def _serve(running: contextlib.ExitStack, handler: Handler, *, answers_health: bool = False) -> ScriptedUpstream:
    """A mock vLLM answering `handler`; its health probe passes unless `answers_health` (the handler's)."""
    def routed(request: Received) -> Reply:
        if request.path == "/health" and not answers_health:
            return Reply(200)
        return handler(request)
    return running.enter_context(ScriptedUpstream(routed))


def _pool(*servers: ScriptedUpstream, **config: Any) -> UpstreamPool:
    settings = {"connect_timeout_s": 1.0, "read_timeout_s": 1.0, **config}
    return UpstreamPool([server.url for server in servers], ClientConfig(**settings), health_interval_s=60)


def _run(pool: UpstreamPool, read: Callable[..., Any], *, after_start: Callable[[], None] = lambda: None,
         hung_up: ScriptedUpstream | None = None) -> Any:
    """Start the pool, call `after_start()`, POST once (as a stream unless `read` is `_json`), read the
    answer with `read(upstream)`, stop the pool. With `hung_up`, that server must have seen its request
    closed before the pool stops (which closes every connection)."""
    async def go() -> Any:
        async with asyncio.timeout(10):  # a broken timeout fails the test instead of hanging it
            return await scripted()

    async def scripted() -> Any:
        await pool.start()
        try:
            after_start()
            try:
                async with pool.open("/v1/chat/completions", {"model": "m"}, {"X-Request-Id": "r"},
                                     stream=read is not _json) as upstream:
                    return await read(upstream)
            finally:
                if hung_up is not None:
                    assert await asyncio.to_thread(hung_up.wait_for_hang_ups, 1), "vLLM's request was left open"
        finally:
            await pool.stop()
    return asyncio.run(go())


async def _json(upstream) -> dict:
    return await upstream.read_json(max_bytes=1 << 20)


async def _events(upstream) -> list[dict]:
    return [event async for batch in upstream.event_batches() for event in batch]


async def _first_batch(upstream) -> list[dict]:
    async with contextlib.aclosing(upstream.event_batches()) as batches:
        return await anext(batches)


def _ok(request: Received) -> Reply:
    return Reply(json={"ok": True})


@pytest.mark.parametrize("failure, reason", [("refused", "ClientConnectorError"),
                                             ("closed", "ServerDisconnectedError")])
def test_fails_over_to_a_healthy_upstream_and_marks_the_dead_one(running, failure: str, reason: str) -> None:
    """A passed its health probe, then refuses connections (it stopped listening) or closes them before
    answering: the request goes to B, and A is out."""
    a = _serve(running, lambda request: Reply(first="close"))
    b = _serve(running, _ok)
    pool = _pool(a, b)
    assert _run(pool, _json, after_start=a.stop_listening if failure == "refused" else lambda: None) == {"ok": True}
    assert [upstream.healthy for upstream in pool.upstreams] == [False, True]
    assert reason in pool.upstreams[0].last_error
    assert len(b.chat_requests()) == 1


def test_no_reachable_upstream_is_unavailable(running) -> None:
    servers = [_serve(running, _ok) for _ in range(2)]

    def refuse() -> None:
        for server in servers:
            server.stop_listening()
    with pytest.raises(UpstreamUnavailable, match="ClientConnectorError"):
        _run(_pool(*servers), _json, after_start=refuse)


def test_a_4xx_is_passed_on_with_its_message(running) -> None:
    def handler(request: Received) -> Reply:
        return Reply(400, json={"error": {"message": "too long", "type": "BadRequestError",
                                          "param": "messages", "code": 400}})
    with pytest.raises(UpstreamRejected) as caught:
        _run(_pool(_serve(running, handler)), _json)
    error = caught.value
    assert (error.status_code, error.message, error.error_type, error.param, error.code) == \
        (400, "too long", "BadRequestError", "messages", None)


@pytest.mark.parametrize("then, expected", [
    ("stall", UpstreamTimeout),  # silent for longer than the read timeout
    ("drop", UpstreamDisconnected),  # the connection closes in the middle of the body
])
@pytest.mark.parametrize("read", [_events, _json], ids=["stream", "whole"])
def test_failures_while_reading_become_gateway_errors(running, then: str, expected: type, read) -> None:
    server = _serve(running, lambda request: Reply(parts=[b'data: {"a": 1}\n\n'], then=then))
    with pytest.raises(expected):  # a stalled request is closed (vLLM aborts it); a dropped one is over
        _run(_pool(server, read_timeout_s=0.2), read, hung_up=server if then == "stall" else None)


@pytest.mark.parametrize("read", [_events, _json], ids=["stream", "whole"])
def test_no_answer_within_the_read_timeout_is_a_timeout_and_closes_vllms_request(running, read) -> None:
    """(A stream's opening has a timer of its own: its request carries no aiohttp read timeout.)"""
    server = _serve(running, lambda request: Reply(first="hang"))
    pool = _pool(server, read_timeout_s=0.2)
    with pytest.raises(UpstreamTimeout, match="did not answer in time"):
        _run(pool, read, hung_up=server)
    assert pool.upstreams[0].healthy  # a slow answer is not a dead server


@pytest.mark.parametrize("read", [_events, _json], ids=["stream", "whole"])
def test_an_error_whose_body_never_ends_is_reported_by_its_status_after_the_read_timeout(running, read) -> None:
    server = _serve(running, lambda request: Reply(500, parts=[b'{"error": '], then="stall"))
    started = time.monotonic()
    with pytest.raises(UpstreamFailed, match="HTTP 500"):
        _run(_pool(server, read_timeout_s=0.2), read, hung_up=server)
    assert 0.2 <= time.monotonic() - started < 5


def test_a_stream_is_cut_by_one_silence_not_by_its_length(running) -> None:
    """The read timeout bounds each wait for the stream's next bytes: a stream that lasts many read
    timeouts with shorter gaps is relayed whole; a gap longer than the read timeout ends it."""
    steady = _serve(running, lambda request: Reply(
        parts=[b'data: {"n": %d}\n\n' % index for index in range(12)] + [b"data: [DONE]\n\n"],
        part_delay_s=0.05))
    assert _run(_pool(steady, read_timeout_s=0.2), _events) == [{"n": index} for index in range(12)]

    silent = _serve(running, lambda request: Reply(parts=[b'data: {"n": 0}\n\n', b'data: {"n": 1}\n\n'],
                                                   then="stall"))  # silent after two events, until the client leaves
    received: list[dict] = []
    last_event_at: list[float] = []

    async def read(upstream) -> None:
        async for batch in upstream.event_batches():
            received.extend(batch)
            last_event_at.append(time.monotonic())

    with pytest.raises(UpstreamTimeout, match="stopped sending"):
        _run(_pool(silent, read_timeout_s=0.3), read, hung_up=silent)
    assert received == [{"n": 0}, {"n": 1}]
    assert 0.3 <= time.monotonic() - last_event_at[-1] < 5  # not before the silence reached the read timeout


def test_a_streams_reads_carry_no_per_read_timer_and_a_whole_answers_keep_aiohttps(running) -> None:
    """The relay's speed-up (docs/performance.md, section 4): after its headers, a stream's connection
    has no aiohttp read timeout (the watchdog bounds its reads); a whole answer keeps it."""
    server = _serve(running, lambda request: Reply(parts=[b'data: {"a": 1}\n\n'], then="stall"))  # held open
    pool = _pool(server, read_timeout_s=7.0)

    async def go() -> list[float | None]:
        await pool.start()
        try:
            timeouts = []
            for stream in (True, False):
                async with pool.open("/v1/chat/completions", {}, {}, stream=stream) as upstream:
                    timeouts.append(upstream._response.connection.protocol.read_timeout)
                    assert upstream.silence_s == (7.0 if stream else None)
            return timeouts
        finally:
            await pool.stop()

    assert asyncio.run(go()) == [None, 7.0]


def test_an_answer_opened_as_a_stream_is_not_read_whole(running) -> None:
    """Its connection has no read timeout; `read_json` would wait on it unbounded, so it refuses."""
    server = _serve(running, lambda request: Reply(parts=[b'data: {"a": 1}\n\n'], then="stall"))
    with pytest.raises(RuntimeError, match="event_batches"):
        _run(_pool(server), _json_of_a_stream)  # not `_json`: `_run` opens it as a stream


async def _json_of_a_stream(upstream) -> dict:
    return await upstream.read_json(max_bytes=1 << 20)


def test_events_end_at_done_and_a_cut_stream_is_a_disconnect(running) -> None:
    complete = _serve(running, lambda request: Reply(parts=[b'data: {"a": 1}\n\n', b"data: [DONE]\n\n"]))
    assert _run(_pool(complete), _events) == [{"a": 1}]

    cut = _serve(running, lambda request: Reply(parts=[b'data: {"a": 1}\n\n']))  # the body ends, no [DONE]
    with pytest.raises(UpstreamDisconnected, match="before it was complete"):
        _run(_pool(cut), _events)


def test_an_unstarted_pool_says_so(running) -> None:
    with pytest.raises(RuntimeError, match="not started"):
        _ = _pool(_serve(running, _ok)).session


def test_leaving_an_answer_early_closes_vllms_request_and_a_whole_answer_keeps_the_connection(running) -> None:
    """Leaving `open` before the end of a stream closes its connection, which vLLM takes as an abort;
    an answer read to its end gives its connection back to the pool, and the next request reuses it."""
    def handler(request: Received) -> Reply:
        if request.json()["stream"]:
            return Reply(parts=[b'data: {"a": 1}\n\n'], then="stall")
        return Reply(json={"ok": True})
    server = _serve(running, handler)
    pool = _pool(server)

    async def go() -> None:
        await pool.start()
        try:
            async with pool.open("/v1/chat/completions", {"stream": True}, {}) as upstream:
                assert await _first_batch(upstream) == [{"a": 1}]
            assert await asyncio.to_thread(server.wait_for_hang_ups, 1)
            for _ in range(2):
                async with pool.open("/v1/chat/completions", {"stream": False}, {}) as upstream:
                    assert await upstream.read_json(max_bytes=1024) == {"ok": True}
        finally:
            await pool.stop()
    asyncio.run(go())
    stream, first, second = (request.connection for request in server.chat_requests())
    assert first != stream and second == first


def test_the_api_key_goes_to_vllm_with_requests_and_health_probes(running) -> None:
    server = _serve(running, _ok, answers_health=True)
    assert _run(_pool(server, api_key="vllm-key"), _json) == {"ok": True}
    assert {request.path for request in server.requests} == {"/health", "/v1/chat/completions"}
    assert all(request.headers["authorization"] == "Bearer vllm-key" for request in server.requests)
    assert server.requests[-1].headers["x-request-id"] == "r"


def test_an_exhausted_connection_pool_is_local_overload_and_vllm_stays_healthy(running) -> None:
    """One connection for two upstreams: while a stream holds it, the next request waits the connect
    timeout for it, then is a 503 `overloaded` that never reached vLLM; both stay healthy, and the
    connection is free again once the stream is closed."""
    servers = [_serve(running, lambda request: Reply(parts=[b'data: {"a": 1}\n\n'], then="stall"))
               for _ in range(2)]
    pool = _pool(*servers, max_connections=1, connect_timeout_s=0.2)

    async def go() -> None:
        await pool.start()
        try:
            async with pool.open("/v1/chat/completions", {}, {}):
                with pytest.raises(GatewayOverloaded) as caught:
                    async with pool.open("/v1/chat/completions", {}, {}):
                        pass
                assert caught.value.status_code == 503 and caught.value.headers == {"Retry-After": "1"}
            async with pool.open("/v1/chat/completions", {}, {}) as upstream:
                assert await _first_batch(upstream) == [{"a": 1}]
        finally:
            await pool.stop()
    asyncio.run(go())
    assert [upstream.healthy for upstream in pool.upstreams] == [True, True]
    assert sum(len(server.chat_requests()) for server in servers) == 2


def test_with_no_healthy_upstream_the_answer_is_a_fast_503_and_one_reprobe_brings_it_back(running,
                                                                                             monkeypatch) -> None:
    monkeypatch.setattr(upstream_module, "MIN_REPROBE_S", 0.0)
    state = {"up": False, "chats": 0, "probes": 0}

    def handler(request: Received) -> Reply:
        if request.path == "/health":
            state["probes"] += 1
            return Reply(200 if state["up"] else 503)
        state["chats"] += 1
        return Reply(json={"ok": True})
    pool = _pool(_serve(running, handler, answers_health=True))

    async def go() -> None:
        await pool.start()
        try:
            with pytest.raises(UpstreamUnavailable) as caught:
                async with pool.open("/v1/chat/completions", {}, {}):
                    pass
            assert caught.value.headers == {"Retry-After": "60"} and "/health 503" in caught.value.message
            assert state["chats"] == 0 and state["probes"] == 2  # start, then the request's re-probe
            state["up"] = True  # vLLM is back: the next request's re-probe sees it, no 60 s wait
            async with pool.open("/v1/chat/completions", {}, {}) as answer:
                assert await answer.read_json(max_bytes=1024) == {"ok": True}
            assert state["chats"] == 1
        finally:
            await pool.stop()
    asyncio.run(go())


def test_a_failing_upstream_is_ejected_for_a_cooldown_that_doubles_and_resets(running) -> None:
    """Connection failures eject at once, consecutive 5xx after `after_5xx`; the probe cannot bring an
    upstream back before its cooldown ends, the cooldown doubles with each ejection in a row, and a
    successful answer resets it. The pool's clock is moved by hand. The connection failure: vLLM
    closes the connection before answering."""
    now = [1000.0]
    state = {"mode": "close"}

    def handler(request: Received) -> Reply:
        if request.path == "/health":
            return Reply(200)  # the probe always answers: only the cooldown keeps it out
        if state["mode"] == "close":
            return Reply(first="close")
        return Reply(500 if state["mode"] == "500" else 200, json={"ok": True})
    server = _serve(running, handler, answers_health=True)
    pool = UpstreamPool([server.url], ClientConfig(connect_timeout_s=1, read_timeout_s=1), health_interval_s=60,
                        ejection=upstream_module.Ejection(base_s=2.0, max_s=5.0, after_5xx=3), clock=lambda: now[0])
    upstream = pool.upstreams[0]

    async def request() -> int:
        try:
            async with pool.open("/v1/chat/completions", {}, {}):
                return 200
        except (UpstreamUnavailable, upstream_module.UpstreamFailed) as exc:
            return exc.status_code

    async def go() -> None:
        await pool.start()
        try:
            assert await request() == 503 and not upstream.healthy  # closed: ejected for 2 s
            assert "ejected for 2 s" in upstream.last_error
            await pool.check_health()
            assert not upstream.healthy  # the probe answers, but the cooldown is not over
            now[0] += 2.0
            await pool.check_health()
            assert upstream.healthy
            assert await request() == 503 and "ejected for 4 s" in upstream.last_error  # again: doubled
            now[0] += 4.0
            await pool.check_health()
            assert await request() == 503 and "ejected for 5 s" in upstream.last_error  # capped at max_s
            now[0] += 5.0
            state["mode"] = "ok"
            await pool.check_health()
            assert await request() == 200 and upstream.ejections == 0  # an answer resets the doubling
            state["mode"] = "500"
            assert [await request() for _ in range(4)] == [502] * 4
            assert upstream.healthy  # 5xx never take the last healthy upstream out
        finally:
            await pool.stop()
    asyncio.run(go())


def test_consecutive_5xx_eject_an_upstream_while_another_is_healthy(running) -> None:
    a = _serve(running, lambda request: Reply(500, json={"ok": True}))
    b = _serve(running, _ok)
    pool = UpstreamPool([a.url, b.url], ClientConfig(connect_timeout_s=1, read_timeout_s=1), health_interval_s=60,
                        ejection=upstream_module.Ejection(after_5xx=3))

    async def go() -> list[int]:
        await pool.start()
        statuses = []
        try:
            for _ in range(10):
                try:
                    async with pool.open("/v1/chat/completions", {}, {}):
                        statuses.append(200)
                except upstream_module.UpstreamFailed as exc:
                    statuses.append(exc.status_code)
        finally:
            await pool.stop()
        return statuses
    statuses = asyncio.run(go())
    # Round-robin alternates A (500) and B (200) until A's third 500 in a row ejects it; then only B.
    assert statuses == [502, 200, 502, 200, 502, 200, 200, 200, 200, 200]
    first = pool.upstreams[0]
    assert not first.healthy and "3 answers with HTTP 5xx in a row" in first.last_error


def test_the_silence_stop_spares_a_read_whose_bytes_came_in_the_same_loop_turn() -> None:
    """On aiohttp's real StreamReader: bytes received since the read began (or the end of the body)
    mean the read is not silent; otherwise the pending read raises the read timeout."""
    class Protocol:  # what StreamReader asks of its connection's protocol (flow control: nothing to do)
        _reading_paused = False
        connected = True

        def pause_reading(self) -> None:
            pass

        def resume_reading(self) -> None:
            pass

    async def main() -> None:
        content = aiohttp.StreamReader(Protocol(), 2**16, loop=asyncio.get_running_loop())
        stop = upstream_module.SilentReadStop(content)
        stop.received_before = content.total_bytes
        read = asyncio.ensure_future(content.readany())
        await asyncio.sleep(0)
        content.feed_data(b"data: {}\n\n")  # arrived; the reading task has not run yet
        assert stop() is False
        assert await read == b"data: {}\n\n"

        stop.received_before = content.total_bytes
        read = asyncio.ensure_future(content.readany())
        await asyncio.sleep(0)
        assert stop() is True
        with pytest.raises(aiohttp.SocketTimeoutError):
            await read

    asyncio.run(main())
