"""Refusal judges: decide whether an answer is a refusal, on whole texts and on streams.

One pure package shared by the gateway (live metrics), the evaluation harness and the trainer's
label stage, so a refusal means the same thing everywhere. It knows nothing about HTTP, models or
metrics.

- `paper` (`PaperMatcher`, `safeprompt.judge.paper`): the DRO paper's string matcher, exactly, for
  figures comparable with the paper.
- `phrases` (`PhraseJudge`, `safeprompt.judge.phrases`): broader phrase rules over the opening of the
  answer; the default (measured against hand labels in docs/judges.md).
- `learned` (`LearnedJudge`, `safeprompt.judge.learned`): a logistic-regression model over the
  opening's words with the phrase rules as features, weights in `refusal_model.json`.

Not in the registry: `safeprompt.judge.model_judge`, the request to and the verdict of a refusal judge
*model* served behind an OpenAI-compatible API (it reads the request too and costs a model call, so it
is used by evaluation and the gateway's sampled audit, never per answer on the hot path).

Every judge reads only an opening *window* of the answer. `window_closed(text)` says when more text
can no longer change the verdict, which lets `StreamVerdict` stop buffering a streamed answer and
lets samplers stop generating early. For any text t and any extension t + s, `window_closed(t)`
implies `judge(t) == judge(t + s)`; the tests check this property for every registered judge.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path

from safeprompt.files import sha256_text
from safeprompt.judge.base import Judge, Verdict
from safeprompt.judge.learned import LearnedJudge
from safeprompt.judge.paper import (
    INLINE_LIST,
    LIST_MARKERS,
    MATCH_STRINGS,
    WINDOW_PARAGRAPHS,
    PaperMatcher,
    match_refusal,
    opening_window,
)
from safeprompt.judge.phrases import PhraseJudge
from safeprompt.judge.stream import StreamVerdict

# Registry of judge factories by name.
JUDGES: dict[str, Callable[[], Judge]] = {"learned": LearnedJudge, "paper": PaperMatcher, "phrases": PhraseJudge}
DEFAULT_JUDGE = "phrases"


def judge_revision(name: str) -> str:
    """A digest of the source of the module that defines judge `name`: it changes whenever its rules do.

    The trainer puts it into the label stage's fingerprint, so labels judged by an older revision of a
    judge are judged again rather than reused under the same name.
    """
    judge = get_judge(name)
    source = Path(inspect.getfile(type(judge))).read_text(encoding="utf-8")
    # A judge built on other parts (the learned judge: the phrase rules and its weights) names them.
    extra = getattr(judge, "revision_material", "")
    return sha256_text(source + extra)[:16]


def get_judge(name: str) -> Judge:
    """Build the judge registered under `name`; ValueError names the known judges otherwise."""
    try:
        factory = JUDGES[name]
    except KeyError:
        raise ValueError(f"unknown judge {name!r}; known judges: {', '.join(sorted(JUDGES))}") from None
    return factory()


__all__ = [
    "DEFAULT_JUDGE",
    "INLINE_LIST",
    "JUDGES",
    "LearnedJudge",
    "LIST_MARKERS",
    "MATCH_STRINGS",
    "WINDOW_PARAGRAPHS",
    "Judge",
    "PaperMatcher",
    "PhraseJudge",
    "StreamVerdict",
    "Verdict",
    "get_judge",
    "judge_revision",
    "match_refusal",
    "opening_window",
]
