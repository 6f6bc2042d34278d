"""Relaying a vLLM stream to the client: the streaming half of `POST /v1/chat/completions`.

Three parts, each with one job: the upstream's events arrive parsed (`UpstreamResponse.event_batches`),
`rewrite_chunk` is the pure rewrite of one chunk into what the client receives, and `Accounting`
records usage, time to first token and verdicts. `relay` joins them: it forwards every chunk (the
chunks that arrived in one read from vLLM go out in one write to the client),
ends with `data: [DONE]`, or, when anything fails mid-stream, with one error event then `[DONE]`,
and closes the upstream (which makes vLLM abort the generation) and finishes the accounting
exactly once, however the stream ended.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from gateway.accounting import Accounting
from gateway.errors import error_sse, to_gateway_error
from gateway.sse import DONE_EVENT, encode_event
from gateway.upstream import UpstreamResponse


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
) -> AsyncIterator[bytes]:
    """The SSE body sent to the client for one upstream stream."""
    try:
        async with contextlib.aclosing(upstream.event_batches()) as batches:
            async for batch in batches:
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
    the client disconnects, not whenever the generator is garbage-collected."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
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
) -> StreamingResponse:
    """The streaming response; from here on the relay owns the upstream and the accounting."""
    accounting.stream_started()
    body = relay(upstream, close_upstream, accounting, model_id=model_id, include_usage=include_usage)
    return ClosingStreamingResponse(
        body, media_type="text/event-stream", headers={**accounting.response_headers, "Cache-Control": "no-cache"}
    )
