"""The streaming response's write watchdog: one timer per stream cuts a write the client leaves unread.

Driven through `ClosingStreamingResponse` as the ASGI server drives it (the task-group path uvicorn's
ASGI 2 scope takes), with a `send` that blocks like a client whose socket buffers are full.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from gateway.relay import ClosingStreamingResponse
from gateway.watchdog import StallWatchdog

SCOPE = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}


async def never_disconnects() -> dict:
    await asyncio.Event().wait()
    return {"type": "http.disconnect"}


class Body:
    def __init__(self, chunks: int) -> None:
        self.chunks, self.closed = chunks, False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            for index in range(self.chunks):
                yield b"data: %d\n\n" % index
        finally:
            self.closed = True


def run(response: ClosingStreamingResponse, send) -> None:
    asyncio.run(asyncio.wait_for(response(SCOPE, never_disconnects, send), 10))


def test_a_write_left_unread_is_cut_once_and_counted() -> None:
    sent: list[dict] = []
    too_slow: list[bool] = []
    body = Body(100)

    async def send(message: dict) -> None:
        sent.append(message)
        if len(sent) == 3:  # the client stops reading after two messages
            await asyncio.Event().wait()

    response = ClosingStreamingResponse(body, write_timeout_s=0.05, on_too_slow=lambda: too_slow.append(True))
    run(response, send)  # returns: the response gave up instead of waiting forever
    assert too_slow == [True]
    assert body.closed  # the body generator was closed: vLLM's request ends with it
    assert len(sent) == 3 and not any(message.get("more_body") is False for message in sent)


def test_writes_that_complete_are_never_cut_however_long_the_stream() -> None:
    sent: list[dict] = []
    too_slow: list[bool] = []

    async def send(message: dict) -> None:
        sent.append(message)
        await asyncio.sleep(0.005)  # each write completes well within the timeout; the stream outlasts it

    response = ClosingStreamingResponse(Body(40), write_timeout_s=0.05, on_too_slow=lambda: too_slow.append(True))
    run(response, send)
    assert too_slow == []
    assert len(sent) == 1 + 40 + 1 and sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}


def test_a_cancellation_from_elsewhere_is_not_taken_for_a_slow_client() -> None:
    too_slow: list[bool] = []

    async def send(message: dict) -> None:
        await asyncio.Event().wait()

    async def main() -> None:
        response = ClosingStreamingResponse(Body(5), write_timeout_s=30, on_too_slow=lambda: too_slow.append(True))
        task = asyncio.create_task(response(SCOPE, never_disconnects, send))
        await asyncio.sleep(0.05)
        task.cancel()  # e.g. the server shutting down
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert too_slow == []


def test_a_watchdog_that_finds_the_wait_was_not_stalled_keeps_watching() -> None:
    """`on_stall` may find the wait ended in the same loop turn (bytes arrived): the watchdog is not
    done, and a later stall of the same wait is still caught."""
    answers = iter([False, True])
    calls: list[float] = []

    async def main() -> StallWatchdog:
        watchdog = StallWatchdog(0.05, lambda: calls.append(asyncio.get_running_loop().time()) or next(answers))
        watchdog.pending_since = watchdog.loop.time()
        await asyncio.sleep(0.3)
        watchdog.stop()
        return watchdog

    watchdog = asyncio.run(main())
    assert watchdog.stalled and len(calls) == 2
    assert calls[1] - calls[0] >= 0.05  # looked again a whole timeout later
