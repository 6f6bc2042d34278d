"""Parsing a Llama-Guard-style verdict: the first non-empty line decides; anything else is unparseable."""

from __future__ import annotations

import pytest

from evaluation.guard import parse_guard_output


@pytest.mark.parametrize("text, expected", [
    ("unsafe\nS1", True),           # Llama Guard 3: verdict line, then the category
    ("\n\nunsafe\nS9,S10", True),    # leading blank lines (Llama Guard 3 starts with "\n\n")
    ("safe", False),
    ("  Safe  ", False),
    ("UNSAFE", True),
    ("", None),
    ("The answer is unsafe", None),  # not a verdict line
    ("safe-ish\nunsafe", None),      # only the first non-empty line counts
])
def test_parse_guard_output(text: str, expected: bool | None) -> None:
    assert parse_guard_output(text) is expected
