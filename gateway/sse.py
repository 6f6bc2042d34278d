"""Server-sent events as OpenAI streams use them: `data: <json>` events ended by `data: [DONE]`.

`read_events` parses an upstream stream's lines into JSON events; `encode_event` and `DONE_EVENT`
write them back. Knows nothing about chat semantics, HTTP clients or metrics.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import orjson

DONE_EVENT = b"data: [DONE]\n\n"


class IncompleteStream(Exception):
    """The stream ended without `data: [DONE]`, or an event was not JSON."""


def encode_event(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


async def read_events(lines: AsyncIterator[str]) -> AsyncGenerator[dict[str, Any], None]:
    """Each `data:` event of an SSE stream as a JSON object, up to `data: [DONE]`.

    Other lines (comments, blank separators, `event:` fields) are skipped. Raises
    `IncompleteStream` when the lines end before `[DONE]` or an event does not parse.
    """
    async for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        try:
            event = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise IncompleteStream("an event is not valid JSON") from None
        yield event
    raise IncompleteStream("the stream ended before data: [DONE]")
