"""Relaying a vLLM stream to the client: the streaming half of `POST /v1/chat/completions`.

Three parts, each with one job: the upstream's events arrive parsed (`UpstreamResponse.event_batches`),
`rewrite_chunk` is the pure rewrite of one chunk into what the client receives, and `Accounting`
records usage, time to first token and verdicts. `relay` joins them: it forwards every chunk (the
chunks that arrived in one read from vLLM go out in one write to the client),
ends with `data: [DONE]`, or, when anything fails mid-stream, with one error event then `[DONE]`,
and closes the upstream (which makes vLLM abort the generation) and finishes the accounting
exactly once, however the stream ended. Deadlines (`gateway.deadlines`) bound the wait for vLLM's
first event and for the end; a client that leaves a write unread for `client_write_timeout_s` has
its stream cut (`ClosingStreamingResponse`), counted as `client_too_slow`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from gateway.accounting import Accounting
from gateway.deadlines import WHOLE_REQUEST, bounded
from gateway.errors import error_sse, to_gateway_error
from gateway.sse import DONE_EVENT, encode_event
from gateway.upstream import UpstreamResponse
from gateway.watchdog import StallWatchdog


def rewrite_chunk(chunk: dict[str, Any], *, model_id: str, include_usage: bool) -> dict[str, Any] | None:
    """The chunk as the client receives it, or None when the client must not see it.

    `model` becomes the id the client asked for. The gateway always asks vLLM for usage (for the
    token metrics); unless the client asked too, the usage-only chunk is dropped and `usage` is
    removed from the others. vLLM's error events pass unchanged. Does not modify `chunk`.
    """
    if "error" in chunk:
        return chunk
    if not include_usage:
        if not chunk.get("choices"):
            return None
        chunk = {key: value for key, value in chunk.items() if key != "usage"}
    return {**chunk, "model": model_id}


async def relay(
    upstream: UpstreamResponse,
    close_upstream: contextlib.AsyncExitStack,
    accounting: Accounting,
    *,
    model_id: str,
    include_usage: bool,
    first_event: tuple[float | None, str] = (None, WHOLE_REQUEST),
    end: float | None = None,
    silence_s: float = float("inf"),
) -> AsyncIterator[bytes]:
    """The SSE body sent to the client for one upstream stream; `first_event` is the deadline for
    vLLM's first event and its error code, `end` the deadline for the last (event-loop times), both
    applied by `gateway.deadlines.bounded`."""
    try:
        async with (
            contextlib.aclosing(upstream.event_batches()) as batches,
            contextlib.aclosing(bounded(batches, first_event=first_event, end=end, silence_s=silence_s)) as timed,
        ):
            async for batch in timed:
                parts = []
                for chunk in batch:
                    accounting.chunk(chunk)
                    rewritten = rewrite_chunk(chunk, model_id=model_id, include_usage=include_usage)
                    if rewritten is not None:
                        parts.append(encode_event(rewritten))
                if parts:
                    yield b"".join(parts)
        yield DONE_EVENT
    except (asyncio.CancelledError, GeneratorExit):
        accounting.client_disconnected()
        raise
    except Exception as exc:
        error = to_gateway_error(exc)
        accounting.fail(error)
        yield error_sse(error)
    finally:
        await close_upstream.aclose()
        accounting.stream_ended(upstream_s=upstream.waited_s)
        accounting.finish()


class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that always closes its body generator, so the generator's cleanup
    (closing the vLLM stream, which aborts generation, and counting the answer) runs promptly when
    the client disconnects, not whenever the generator is garbage-collected; and that cuts the
    stream when one write waits longer than `write_timeout_s` for the client to read (a client
    that stops reading would otherwise hold its vLLM request and a pooled connection forever)."""

    def __init__(
        self,
        content: AsyncIterator[bytes],
        *,
        write_timeout_s: float | None = None,
        on_too_slow: Callable[[], None] = lambda: None,
        **kwargs: Any,
    ) -> None:
        super().__init__(content, **kwargs)
        self.write_timeout_s = write_timeout_s
        self.on_too_slow = on_too_slow

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("a streaming response needs a running task")
        if self.write_timeout_s is None:
            timed_send, watchdog = send, None
        else:
            watchdog = StallWatchdog(self.write_timeout_s, task.cancel)  # one timer per stream, not per write

            async def timed_send(message: Any) -> None:
                watchdog.pending_since = watchdog.loop.time()
                try:
                    await send(message)
                finally:
                    watchdog.pending_since = None

        try:
            await super().__call__(scope, receive, timed_send)
        except asyncio.CancelledError:
            if watchdog is None or not watchdog.stalled or task.uncancel() > 0:
                raise
            self.on_too_slow()  # the response is left incomplete: the server closes the connection
        finally:
            if watchdog is not None:
                watchdog.stop()
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


def stream_response(
    upstream: UpstreamResponse,
    close_upstream: contextlib.AsyncExitStack,
    accounting: Accounting,
    *,
    model_id: str,
    include_usage: bool,
    first_event: tuple[float | None, str] = (None, WHOLE_REQUEST),
    end: float | None = None,
    silence_s: float = float("inf"),
    write_timeout_s: float | None = None,
) -> StreamingResponse:
    """The streaming response; from here on the relay owns the upstream and the accounting."""
    accounting.stream_started()
    body = relay(
        upstream,
        close_upstream,
        accounting,
        model_id=model_id,
        include_usage=include_usage,
        first_event=first_event,
        end=end,
        silence_s=silence_s,
    )
    return ClosingStreamingResponse(
        body,
        media_type="text/event-stream",
        headers={**accounting.response_headers, "Cache-Control": "no-cache"},
        write_timeout_s=write_timeout_s,
        on_too_slow=accounting.client_too_slow,
    )
