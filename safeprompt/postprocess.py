"""The DRO paper's answer post-processing, applied before an answer is judged or its length counted.

`trim_unfinished_tail`: strip, then drop trailing lines while the text does not end in '.', '?' or
'!' (or ends in a digit + '.', an unfinished list item) and has more than one line (authors'
`generate.py` post-processing). Used by the trainer's labels and the evaluation's sampled answers.
"""

from __future__ import annotations

import re

_UNFINISHED_LIST_ITEM = re.compile(r"\d\.$")


def trim_unfinished_tail(text: str) -> str:
    text = text.strip()
    while (not text.endswith((".", "?", "!")) or _UNFINISHED_LIST_ITEM.search(text)) and "\n" in text:
        text = text.rsplit("\n", 1)[0].rstrip()
    return text
