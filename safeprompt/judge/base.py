"""The judge interface: a `Verdict` and the `Judge` protocol every refusal judge implements.

A judge is pure and cheap: `judge(text)` decides on an answer's text alone, and `window_closed(text)`
says when more text can no longer change that decision. For any text t and any extension t + s,
`window_closed(t)` implies `judge(t) == judge(t + s)`; the tests check this for every judge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Verdict:
    """A judge's decision on one answer. `matched` names the rule that fired, if any."""

    refusal: bool
    judge: str
    matched: str | None = None


class Judge(Protocol):
    """A refusal judge. Implementations are pure and cheap enough to run on every answer."""

    name: str

    def judge(self, text: str) -> Verdict: ...

    def window_closed(self, text: str) -> bool: ...
