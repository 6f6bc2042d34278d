"""Incremental verdicts on streamed answers: buffer only until the judge's window closes.

Knows the `Judge` protocol only; it works for every judge.
"""

from __future__ import annotations

from safeprompt.judge.base import Judge, Verdict


class StreamVerdict:
    """Incremental verdict for one streamed choice.

    Feed text deltas as they arrive; buffering stops as soon as the judge's window is closed, so
    memory is bounded by the window, not by the answer. `verdict()` equals `judge.judge(full_text)`
    for the full text fed so far (the property the tests check), whether the stream ended normally,
    was cut by the client or failed upstream.
    """

    # Hard cap on buffered characters for an answer whose window never closes (one endless
    # paragraph): a client cannot make the gateway buffer unboundedly.
    MAX_BUFFER_CHARS = 65536

    def __init__(self, judge: Judge) -> None:
        self._judge = judge
        self._parts: list[str] = []
        self._size = 0
        self._closed = False
        self._since_check = 0

    @property
    def closed(self) -> bool:
        return self._closed

    def feed(self, delta: str) -> None:
        if self._closed or not delta:
            return
        room = self.MAX_BUFFER_CHARS - self._size
        delta = delta[:room]
        self._parts.append(delta)
        self._size += len(delta)
        self._since_check += len(delta)
        # Re-check the window only when it can have changed: a newline arrived, the current
        # paragraph is still short (a list marker may be forming), or " 1. " may have formed.
        # Checking at least every 256 characters bounds the work per answer.
        if "\n" in delta or " 1. " in delta or self._size < 16 or self._since_check >= 256:
            self._check()
        elif self._size >= self.MAX_BUFFER_CHARS:
            self._check()

    def _check(self) -> None:
        text = "".join(self._parts)
        self._parts = [text]
        self._since_check = 0
        if self._judge.window_closed(text) or self._size >= self.MAX_BUFFER_CHARS:
            self._closed = True

    @property
    def text(self) -> str:
        return "".join(self._parts)

    def verdict(self) -> Verdict:
        return self._judge.judge(self.text)
