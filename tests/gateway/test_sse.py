"""SSE parsing and writing (gateway/sse.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from gateway.sse import DONE_EVENT, IncompleteStream, encode_event, read_events


async def _lines(*lines: str) -> AsyncIterator[str]:
    for line in lines:
        yield line


def _read(*lines: str) -> list[dict]:
    async def collect() -> list[dict]:
        return [event async for event in read_events(_lines(*lines))]
    return asyncio.run(collect())


def test_events_up_to_done_skipping_other_lines() -> None:
    assert _read(": keep-alive", 'data: {"a": 1}', "", "event: x", 'data:{"b":2}', "data: [DONE]",
                 'data: {"after": 1}') == [{"a": 1}, {"b": 2}]


@pytest.mark.parametrize("lines", [('data: {"a": 1}',), ('data: {"a": 1}', "data: {not json")])
def test_a_stream_without_done_or_with_a_broken_event_is_incomplete(lines: tuple[str, ...]) -> None:
    with pytest.raises(IncompleteStream):
        _read(*lines)


def test_encoding() -> None:
    assert encode_event({"a": 1}) == b'data: {"a":1}\n\n'
    assert DONE_EVENT == b"data: [DONE]\n\n"
