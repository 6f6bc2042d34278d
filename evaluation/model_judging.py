"""The optional refusal judge model: a verdict per answer from a model behind an OpenAI-compatible API.

What to send and how to read the answer is `safeprompt.judge.model_judge` (shared with the gateway's
audit), sent by `safeprompt.model_judge_client.ModelJudgeClient`; this module names the run
directory's verdict cache.
The cache file carries a digest of every setting that changes a verdict (format, model, threshold,
constraint, cut) and of the judge's prompt and reading, so a rerun with other settings, or after
`safeprompt/judge/model_judge.py` changed, judges again instead of mixing verdicts.
This module knows nothing about sets or metrics.
"""

from __future__ import annotations

import re

from safeprompt.files import sha256_text
from safeprompt.judge.model_judge import ModelJudgeSettings, revision



def verdict_file(settings: ModelJudgeSettings) -> str:
    """`model-judge-<model>-<digest>.jsonl`: one cache per served model and verdict-changing settings."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", settings.model)
    return f"model-judge-{safe}-{verdict_digest(settings)}.jsonl"


def verdict_digest(settings: ModelJudgeSettings) -> str:
    """8 hex digits over what decides a verdict: the settings that change it (not the address, key or
    timeout) and the revision of the prompt and its reading (`safeprompt/judge/model_judge.py`)."""
    return sha256_text(settings.model_dump_json(exclude={"base_url", "api_key", "timeout_s"}) + revision())[:8]
