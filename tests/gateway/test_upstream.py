"""The upstream pool (gateway/upstream.py) over an httpx MockTransport: failover, and every
transport failure raised as a gateway error, never as httpx's."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from gateway import upstream as upstream_module
from gateway.errors import (
    GatewayOverloaded,
    UpstreamDisconnected,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.upstream import ClientConfig, UpstreamPool

A, B = "http://a.test", "http://b.test"


def _pool(handler: Callable[[httpx.Request], httpx.Response], urls: list[str]) -> UpstreamPool:
    """A pool whose upstreams pass their health probe (unless `handler` answers /health itself)."""
    def routed(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health" and getattr(handler, "health", None) is None:
            return httpx.Response(200)
        return handler(request)
    return UpstreamPool(urls, ClientConfig(connect_timeout_s=1, read_timeout_s=1), health_interval_s=60,
                        transport=httpx.MockTransport(routed))


def _run(pool: UpstreamPool, read: Callable[..., object]) -> object:
    """Start the pool, POST once, read the answer with `read(upstream)`, stop the pool."""
    async def go() -> object:
        await pool.start()
        try:
            async with pool.open("/v1/chat/completions", {"model": "m"}, {"X-Request-Id": "r"}) as upstream:
                return await read(upstream)
        finally:
            await pool.stop()
    return asyncio.run(go())


async def _json(upstream) -> dict:
    return await upstream.read_json(max_bytes=1 << 20)


async def _events(upstream) -> list[dict]:
    return [event async for batch in upstream.event_batches() for event in batch]


def _stream(*parts: bytes, fail: Exception | None = None) -> httpx.Response:
    async def body() -> AsyncIterator[bytes]:
        for part in parts:
            yield part
        if fail is not None:
            raise fail
    return httpx.Response(200, content=body())


def test_fails_over_to_a_healthy_upstream_and_marks_the_dead_one() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "a.test":
            raise httpx.ConnectError("refused")
        return httpx.Response(200, json={"ok": True})
    pool = _pool(handler, [A, B])
    assert _run(pool, _json) == {"ok": True}
    assert [upstream.healthy for upstream in pool.upstreams] == [False, True]


def test_no_reachable_upstream_is_unavailable() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused")
    with pytest.raises(UpstreamUnavailable, match="ConnectError"):
        _run(_pool(handler, [A, B]), _json)


def test_a_4xx_is_passed_on_with_its_message() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, json={"error": {"message": "too long", "type": "BadRequestError",
                                                   "param": "messages", "code": 400}})
    with pytest.raises(UpstreamRejected) as caught:
        _run(_pool(handler, [A]), _json)
    error = caught.value
    assert (error.status_code, error.message, error.error_type, error.param, error.code) == \
        (400, "too long", "BadRequestError", "messages", None)


@pytest.mark.parametrize("fail, expected", [
    (httpx.ReadTimeout("slow"), UpstreamTimeout),
    (httpx.ReadError("reset"), UpstreamDisconnected),
])
def test_failures_while_reading_become_gateway_errors(fail: Exception, expected: type) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return _stream(b'data: {"a": 1}\n\n', fail=fail)
    with pytest.raises(expected):
        _run(_pool(handler, [A]), _events)
    with pytest.raises(expected):
        _run(_pool(handler, [A]), _json)


def test_events_end_at_done_and_a_cut_stream_is_a_disconnect() -> None:
    def complete(request: httpx.Request) -> httpx.Response:
        return _stream(b'data: {"a": 1}\n\n', b"data: [DONE]\n\n")
    assert _run(_pool(complete, [A]), _events) == [{"a": 1}]

    def cut(request: httpx.Request) -> httpx.Response:
        return _stream(b'data: {"a": 1}\n\n')
    with pytest.raises(UpstreamDisconnected, match="before it was complete"):
        _run(_pool(cut, [A]), _events)


def test_an_unstarted_pool_says_so() -> None:
    with pytest.raises(RuntimeError, match="not started"):
        _ = _pool(lambda request: httpx.Response(200), [A]).client


def test_an_exhausted_connection_pool_is_local_overload_and_vllm_stays_healthy() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.PoolTimeout("no free connection")
    pool = _pool(handler, [A, B])
    with pytest.raises(GatewayOverloaded) as caught:
        _run(pool, _json)
    assert caught.value.status_code == 503 and caught.value.headers == {"Retry-After": "1"}
    assert [upstream.healthy for upstream in pool.upstreams] == [True, True]


def test_with_no_healthy_upstream_the_answer_is_a_fast_503_and_one_reprobe_brings_it_back(monkeypatch) -> None:
    monkeypatch.setattr(upstream_module, "MIN_REPROBE_S", 0.0)
    state = {"up": False, "chats": 0, "probes": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            state["probes"] += 1
            return httpx.Response(200 if state["up"] else 503)
        state["chats"] += 1
        return httpx.Response(200, json={"ok": True})
    handler.health = True  # type: ignore[attr-defined]
    pool = UpstreamPool([A], ClientConfig(connect_timeout_s=1, read_timeout_s=1), health_interval_s=60,
                        transport=httpx.MockTransport(handler))

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


def test_a_failing_upstream_is_ejected_for_a_cooldown_that_doubles_and_resets() -> None:
    """Connection failures eject at once, consecutive 5xx after `after_5xx`; the probe cannot bring an
    upstream back before its cooldown ends, the cooldown doubles with each ejection in a row, and a
    successful answer resets it. The pool's clock is moved by hand."""
    now = [1000.0]
    state = {"mode": "refuse"}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            return httpx.Response(200)  # the probe always answers: only the cooldown keeps it out
        if state["mode"] == "refuse":
            raise httpx.ConnectError("refused")
        return httpx.Response(500 if state["mode"] == "500" else 200, json={"ok": True})
    handler.health = True  # type: ignore[attr-defined]
    pool = UpstreamPool([A], ClientConfig(connect_timeout_s=1, read_timeout_s=1), health_interval_s=60,
                        transport=httpx.MockTransport(handler),
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
            assert await request() == 503 and not upstream.healthy  # refused: ejected for 2 s
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


def test_consecutive_5xx_eject_an_upstream_while_another_is_healthy() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            return httpx.Response(200)
        return httpx.Response(500 if request.url.host == "a.test" else 200, json={"ok": True})
    handler.health = True  # type: ignore[attr-defined]
    pool = UpstreamPool([A, B], ClientConfig(connect_timeout_s=1, read_timeout_s=1), health_interval_s=60,
                        transport=httpx.MockTransport(handler), ejection=upstream_module.Ejection(after_5xx=3))

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
    a = pool.upstreams[0]
    assert not a.healthy and "3 answers with HTTP 5xx in a row" in a.last_error
