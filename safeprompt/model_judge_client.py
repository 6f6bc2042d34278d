"""Asking a refusal judge model over HTTP: `safeprompt.judge.model_judge`'s request sent with the offline client.

`ModelJudgeClient.verdict(query, answer)` posts what `judge_request` builds through a `ChatClient`
(its retries included) and reads the answer with `read_verdict`; an answer that is not an OpenAI
completion is a `ChatRequestError` naming the judge. Thread-safe. Shared by the evaluation harness
(`dro-eval --model-judge-*`), the trainer's labels (`label.model_judge`) and `bench/judge_accuracy.py`;
the gateway's audit sends the same request with its own aiohttp session (gateway/audit.py).
"""

from __future__ import annotations

from safeprompt.client import ChatClient, ChatRequestError
from safeprompt.judge.model_judge import ModelJudgeSettings, ModelVerdict, judge_request, read_verdict


class ModelJudgeClient:
    def __init__(self, settings: ModelJudgeSettings, client: ChatClient) -> None:
        self.settings = settings
        self._client = client

    @property
    def name(self) -> str:
        return self.settings.name

    def verdict(self, query: str, answer: str) -> ModelVerdict:
        path, body = judge_request(self.settings, query, answer)
        reply = self._client.post_json(path, body)
        try:
            return read_verdict(self.settings, reply)
        except ValueError as exc:
            raise ChatRequestError(f"{self.name}: {exc}") from None
