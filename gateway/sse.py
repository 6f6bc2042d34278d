"""Server-sent events as OpenAI streams use them: `data: <json>` events ended by `data: [DONE]`.

`EventParser` turns an upstream stream's bytes, as they arrive, into JSON events (pure, no I/O);
`encode_event` and `DONE_EVENT` write them back. Knows nothing about chat semantics, HTTP clients
or metrics.
"""

from __future__ import annotations

from typing import Any

import orjson

DONE_EVENT = b"data: [DONE]\n\n"


class IncompleteStream(Exception):
    """The stream ended without `data: [DONE]`, or an event was not JSON."""


def encode_event(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


class EventParser:
    """Incremental parser: `feed` the bytes of each network read, get the events it completed.

    Each `data:` line is one JSON event (OpenAI and vLLM never split an event over several data
    lines); other lines (comments, blank separators, `event:` fields) are skipped; lines may end
    in `\\n` or `\\r\\n` and may be split anywhere between reads. After `data: [DONE]`, `done` is
    true and the rest is ignored. Works on bytes, so no text decoding happens on the relay path.
    """

    def __init__(self) -> None:
        self._partial = b""
        self.done = False

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """The events completed by `data`. Raises IncompleteStream on an event that is not JSON."""
        if self.done:
            return []
        lines = (self._partial + data).split(b"\n") if self._partial else data.split(b"\n")
        self._partial = lines.pop()
        events = []
        for line in lines:
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                self.done = True
                self._partial = b""
                break
            try:
                event = orjson.loads(payload)
            except orjson.JSONDecodeError:
                raise IncompleteStream("an event is not valid JSON") from None
            events.append(event)
        return events

    def close(self) -> list[dict[str, Any]]:
        """The end of the stream: a last unterminated line is read, then IncompleteStream is raised
        unless `[DONE]` was seen."""
        events = self.feed(b"\n") if self._partial and not self.done else []
        if not self.done:
            raise IncompleteStream("the stream ended before data: [DONE]")
        return events
