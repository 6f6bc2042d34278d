"""Deadlines of one chat request: for vLLM's first event, and for the whole answer.

- `Deadlines.start(settings)`: the request's end deadline (`request_timeout_s` from now), taken when
  the request is accepted; `first_event()` then gives the deadline for the first event of a stream
  (`first_byte_timeout_s` from the moment it is asked for, never later than the end).
- `within(deadline, awaitable, code=...)`: the awaitable's result, or DeadlineExceeded (504, or an
  error event mid-stream) when the deadline passes first; the awaitable is cancelled, which closes
  the vLLM request and so aborts its generation.
- `bounded(batches, ...)`: a stream's batches of events under the first-event and end deadlines.
Deadlines are event-loop times (monotonic); None means no deadline.
Knows nothing about HTTP.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import TypeVar

from gateway.errors import DeadlineExceeded
from gateway.settings import Settings

T = TypeVar("T")

FIRST_EVENT = "first_byte_deadline"
WHOLE_REQUEST = "request_deadline"


@dataclass(frozen=True)
class Deadlines:
    end: float | None
    first_byte_timeout_s: float | None
    # The longest silence allowed from vLLM (read_timeout_s): a wait that ends before the deadline
    # whatever happens needs no timer of its own (see gateway.relay).
    silence_s: float = float("inf")

    @classmethod
    def start(cls, settings: Settings) -> Deadlines:
        now = asyncio.get_running_loop().time()
        end = now + settings.request_timeout_s if settings.request_timeout_s is not None else None
        return cls(end=end, first_byte_timeout_s=settings.first_byte_timeout_s, silence_s=settings.read_timeout_s)

    def first_event(self) -> tuple[float | None, str]:
        """The deadline for vLLM's first event from now, and the error code if it passes."""
        if self.first_byte_timeout_s is None:
            return self.end, WHOLE_REQUEST
        first = asyncio.get_running_loop().time() + self.first_byte_timeout_s
        if self.end is not None and self.end <= first:
            return self.end, WHOLE_REQUEST
        return first, FIRST_EVENT


MESSAGES = {
    FIRST_EVENT: "vLLM sent nothing within first_byte_timeout_s; the request was cancelled",
    WHOLE_REQUEST: "the answer did not end within request_timeout_s; the request was cancelled",
}


def exceeded(code: str) -> DeadlineExceeded:
    """The error for a deadline that passed (`FIRST_EVENT` or `WHOLE_REQUEST`)."""
    return DeadlineExceeded(MESSAGES[code], code=code)


async def within(deadline: float | None, awaitable: Awaitable[T], *, code: str) -> T:
    if deadline is None:
        return await awaitable
    timer = asyncio.timeout_at(deadline)
    try:
        async with timer:
            return await awaitable
    except TimeoutError:
        if timer.expired():
            raise exceeded(code) from None
        raise


async def bounded(
    batches: AsyncIterator[T],
    *,
    first_event: tuple[float | None, str],
    end: float | None,
    silence_s: float = float("inf"),
) -> AsyncGenerator[T, None]:
    """`batches` until they end, under `first_event` (deadline, code) for the first and `end` for
    the rest; DeadlineExceeded when one passes.

    A timer costs about 10 us a wait, as much as relaying a chunk, so after the first batch one is
    armed only within `silence_s` (the read timeout) of the end: before that, the read timeout
    wakes a silent stream first, and the deadline is checked as each batch arrives. No timer spans
    a yield: each one bounds a single wait for the next batch."""
    loop = asyncio.get_running_loop()
    try:
        yield await within(first_event[0], anext(batches), code=first_event[1])
    except StopAsyncIteration:
        return
    while True:
        timed = end is not None and end - loop.time() < silence_s
        try:
            batch = await (within(end, anext(batches), code=WHOLE_REQUEST) if timed else anext(batches))
        except StopAsyncIteration:
            return
        if end is not None and loop.time() >= end:
            raise exceeded(WHOLE_REQUEST)
        yield batch
