"""What the gateway records about one chat request, from acceptance to its one `finish()`.

`Accounting` fills the request's `RequestRecord` as the request goes: the model and variant once they
are resolved (in flight from then on), the answer's usage, time to first token and refusal verdicts
(per choice: whole texts for plain answers, incrementally with `StreamVerdict` for streams), the
error that ended it, and the time spent waiting on vLLM. `finish()` hands the record to the metrics
and the request log exactly once, however the request ended. With an audit judge configured, a
request the `Auditor` samples when it is accepted also keeps its last user message and choice 0's
text (up to the judge's `max_chars`), offered to the audit when it finishes; other requests keep
nothing more. Knows nothing about HTTP or upstreams: it reads OpenAI-shaped answers and chunks as dicts.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import orjson

from gateway.audit import Auditor, TextPrefix, last_user_text
from gateway.errors import GatewayError
from gateway.prometheus import GatewayMetrics
from gateway.protocol import ChatCompletionRequest
from gateway.request_log import log_request
from gateway.telemetry import RequestRecord
from gateway.variants import ServedModel, Variant
from safeprompt.judge import Judge, StreamVerdict


class Accounting:
    def __init__(
        self,
        record: RequestRecord,
        *,
        judge: Judge,
        metrics: GatewayMetrics,
        log_prompts: bool,
        auditor: Auditor | None = None,
    ) -> None:
        self.record = record
        self._judge = judge
        self._metrics = metrics
        self._log_prompts = log_prompts
        self._choices = 1
        self._streaming = False  # a 200 stream was sent: errors keep that status
        self._stream_verdicts: dict[int, StreamVerdict] = {}
        self._stream_texts: dict[int, list[str]] = {}  # kept only when prompt logging is on
        self._auditor = auditor
        self._audit_answer: TextPrefix | None = None  # choice 0's text, only for a request sampled for the audit
        self._finished = False
        self._on_finish: list[Callable[[RequestRecord], None]] = []

    @property
    def response_headers(self) -> dict[str, str]:
        """Headers of every chat response, errors included: the request id and the variant applied."""
        return {"X-Request-Id": self.record.request_id, "X-Safety-Variant": self.record.variant}

    # --- before the upstream ---------------------------------------------------------------------
    def parsed(self, request: ChatCompletionRequest) -> None:
        """The body is a valid request (its model may still be unknown)."""
        self.record.stream = request.stream
        self._choices = request.n

    def start(self, request: ChatCompletionRequest, model: ServedModel, variant: Variant) -> None:
        """The request was accepted for `model` and `variant`: in flight from now on."""
        record = self.record
        record.model, record.variant = model.name, variant.name
        record.soft_prompt_tokens = variant.num_virtual_tokens
        record.user = request.user
        if self._log_prompts:
            record.prompt_text = orjson.dumps(request.message_dicts()).decode()
        self._metrics.request_started(record.model, record.variant, record.route)
        record.in_flight = True
        auditor = self._auditor
        if auditor is not None and auditor.sampled():
            request_text = last_user_text(request)[: auditor.max_chars]
            answer = self._audit_answer = TextPrefix(auditor.max_chars)
            self.on_finish(lambda record: auditor.offer(record, request_text, answer.text))

    def fail(self, error: GatewayError) -> None:
        """The request ended with `error` (its status too, unless a stream had already begun)."""
        self.record.error_kind = error.kind
        if not self._streaming:
            self.record.status = error.status_code

    # --- answers ---------------------------------------------------------------------------------
    def answer(self, payload: dict[str, Any], *, upstream_s: float) -> None:
        """A whole (non-streaming) answer: one verdict per choice, its usage."""
        texts = [(choice.get("message") or {}).get("content") or "" for choice in payload.get("choices") or []]
        self.record.verdicts.extend(self._judge.judge(text) for text in texts)
        self._usage(payload.get("usage"))
        if self._log_prompts:
            self.record.answer_texts = texts
        if self._audit_answer is not None and texts:
            self._audit_answer.feed(texts[0])
        self.record.upstream_s = upstream_s

    def stream_started(self) -> None:
        self._streaming = True

    def chunk(self, chunk: dict[str, Any]) -> None:
        """One streamed chunk: first token time, each choice's text into its verdict, usage."""
        if "error" in chunk:
            self.record.error_kind = "upstream_5xx"  # vLLM reported a failure inside the stream
            return
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            text = delta.get("content")
            if (text or delta.get("tool_calls")) and self.record.first_token_s is None:
                self.record.first_token_s = time.perf_counter() - self.record.started_s
            if text:
                index = int(choice.get("index", 0))
                self._stream_verdicts.setdefault(index, StreamVerdict(self._judge)).feed(text)
                if self._log_prompts:
                    self._stream_texts.setdefault(index, []).append(text)
                if self._audit_answer is not None and index == 0:
                    self._audit_answer.feed(text)
        self._usage(chunk.get("usage"))

    def client_disconnected(self) -> None:
        if self.record.error_kind != "client_too_slow":  # the gateway cut it, and said why first
            self.record.error_kind = "client_disconnect"

    def client_too_slow(self) -> None:
        self.record.error_kind = "client_too_slow"

    def stream_ended(self, *, upstream_s: float) -> None:
        """The stream is over, however it ended: one verdict per requested choice, on the text sent."""
        verdicts = self._stream_verdicts
        self.record.verdicts.extend(
            verdicts[index].verdict() if index in verdicts else self._judge.judge("") for index in range(self._choices)
        )
        if self._log_prompts:
            self.record.answer_texts = ["".join(self._stream_texts.get(index, [])) for index in range(self._choices)]
        self.record.upstream_s = upstream_s

    def _usage(self, usage: dict[str, Any] | None) -> None:
        if usage:
            self.record.prompt_tokens = usage.get("prompt_tokens")
            self.record.completion_tokens = usage.get("completion_tokens")

    # --- the end ---------------------------------------------------------------------------------
    def finish(self) -> None:
        """Count and log the request; a second call does nothing."""
        if self._finished:
            return
        self._finished = True
        self.record.finish()
        self._metrics.request_finished(self.record)
        log_request(self.record, log_prompts=self._log_prompts)
        for hook in self._on_finish:
            hook(self.record)

    def on_finish(self, hook: Callable[[RequestRecord], None]) -> None:
        """Call `hook` with the finished record (e.g. to charge the request's tokens to its key)."""
        self._on_finish.append(hook)
