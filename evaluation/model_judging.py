"""The optional refusal judge model: a verdict per answer from a model behind an OpenAI-compatible API.

What to send and how to read the answer is `safeprompt.judge.model_judge` (shared with the gateway's
audit); this module sends it with the harness's client and names the run directory's verdict cache.
The cache file carries a digest of every setting that changes a verdict (format, model, threshold,
constraint, cut), so a rerun with other settings judges again instead of mixing verdicts.
This module knows nothing about sets or metrics.
"""

from __future__ import annotations

import re

from safeprompt.files import sha256_text
from safeprompt.judge.model_judge import ModelJudgeSettings, ModelVerdict, judge_request, read_verdict

from evaluation.client import ChatClient, ChatRequestError


def verdict_file(settings: ModelJudgeSettings) -> str:
    """`model-judge-<model>-<digest>.jsonl`: one cache per served model and verdict-changing settings."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", settings.model)
    digest = sha256_text(settings.model_dump_json(exclude={"base_url", "api_key", "timeout_s"}))[:8]
    return f"model-judge-{safe}-{digest}.jsonl"


class ModelRefusalJudge:
    def __init__(self, settings: ModelJudgeSettings, client: ChatClient) -> None:
        self.settings = settings
        self._client = client

    @property
    def name(self) -> str:
        return self.settings.name

    def classify(self, query: str, answer: str) -> ModelVerdict:
        path, body = judge_request(self.settings, query, answer)
        reply = self._client.post_json(path, body)
        try:
            return read_verdict(self.settings, reply)
        except ValueError as exc:
            raise ChatRequestError(f"{self.name}: {exc}") from None
