"""One timer per stream for a wait that must not last too long: a write the client leaves unread
(`gateway.relay`) and a read vLLM leaves unanswered (`gateway.upstream`).

A timer per wait costs about as much CPU as relaying the event it waits for: `asyncio.timeout`
around every write, or aiohttp's `sock_read`, which cancels and re-arms a timer on every read
(docs/performance.md, section 4). A `StallWatchdog` instead lets the stream mark when a wait began
(`pending_since`, the loop's time; None between waits), and one timer looks at the mark at most once
per `timeout_s` and at the pending wait's own deadline, so a wait that never ends is stopped exactly
`timeout_s` after it began.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class StallWatchdog:
    """Calls `on_stall()` when one marked wait has lasted `timeout_s`; it returns whether it ended
    the wait (then `stalled` is set and the watchdog is done) or found it was not stalled after all
    (then it keeps watching). `stop()` when the stream ends. Made inside the running event loop."""

    def __init__(self, timeout_s: float, on_stall: Callable[[], bool]) -> None:
        self.timeout_s = timeout_s
        self.on_stall = on_stall
        self.loop = asyncio.get_running_loop()
        self.pending_since: float | None = None
        self.stalled = False
        self._timer = self.loop.call_later(timeout_s, self._check)

    def _check(self) -> None:
        if self.pending_since is None:
            self._timer = self.loop.call_later(self.timeout_s, self._check)
            return
        deadline = self.pending_since + self.timeout_s
        if self.loop.time() < deadline:
            self._timer = self.loop.call_at(deadline, self._check)
            return
        if self.on_stall():
            self.stalled = True
        else:
            self._timer = self.loop.call_later(self.timeout_s, self._check)

    def stop(self) -> None:
        self._timer.cancel()
