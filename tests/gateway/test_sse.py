"""SSE parsing and writing (gateway/sse.py)."""

from __future__ import annotations

import pytest

from gateway.sse import DONE_EVENT, EventParser, IncompleteStream, encode_event

STREAM = b': keep-alive\n\ndata: {"a": 1}\n\nevent: x\ndata:{"b":2}\r\n\r\ndata: [DONE]\n\ndata: {"after": 1}\n\n'


def _parse(*reads: bytes) -> list[list[dict]]:
    parser = EventParser()
    batches = [parser.feed(data) for data in reads]
    batches.append(parser.close())
    return batches


def test_events_up_to_done_skipping_other_lines_in_one_read() -> None:
    assert _parse(STREAM) == [[{"a": 1}, {"b": 2}], []]


@pytest.mark.parametrize("cut", range(1, len(STREAM)))
def test_reads_split_anywhere_give_the_same_events(cut: int) -> None:
    batches = _parse(STREAM[:cut], STREAM[cut:])
    assert [event for batch in batches for event in batch] == [{"a": 1}, {"b": 2}]


def test_one_byte_at_a_time() -> None:
    parser = EventParser()
    events = [event for byte in STREAM for event in parser.feed(bytes([byte]))]
    assert events == [{"a": 1}, {"b": 2}] and parser.done


def test_done_without_a_final_newline_ends_the_stream() -> None:
    assert _parse(b'data: {"a": 1}\n\ndata: [DONE]') == [[{"a": 1}], []]


def test_after_done_nothing_more_is_parsed() -> None:
    parser = EventParser()
    assert parser.feed(b"data: [DONE]\n\n") == []
    assert parser.feed(b"data: {not json}\n\n") == []
    assert parser.close() == []


@pytest.mark.parametrize("reads", [(b'data: {"a": 1}\n\n',), (b'data: {"a": 1}\n\ndata: {"b"',), (b"",)])
def test_a_stream_that_ends_before_done_is_incomplete(reads: tuple[bytes, ...]) -> None:
    parser = EventParser()
    for data in reads:
        parser.feed(data)
    with pytest.raises(IncompleteStream):
        parser.close()


def test_an_event_that_is_not_json_is_incomplete() -> None:
    with pytest.raises(IncompleteStream):
        EventParser().feed(b'data: {"a": 1}\n\ndata: {not json\n\n')


def test_encoding() -> None:
    assert encode_event({"a": 1}) == b'data: {"a":1}\n\n'
    assert DONE_EVENT == b"data: [DONE]\n\n"
