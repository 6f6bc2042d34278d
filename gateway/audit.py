"""The sampled audit of live refusal verdicts: a bounded queue of finished answers and the workers
that ask a model judge about them, in the background.

The gateway judges every answer with its fast string judge (`safeprompt.judge`). With `audit_judge`
configured, `Auditor` re-judges a random sample of answers with a model judge served behind an
OpenAI-compatible API (what to send and how to read the answer: `safeprompt.judge.model_judge`) and
counts the live verdict against the audit's (`GatewayMetrics.answer_audited`), so dashboards show
how often the live judge agrees with a stronger one, per model and variant.

Never on a request's path: `sampled()` and `offer()` are synchronous, O(1), never wait and never
raise, and nothing a request sends or receives depends on the judge being slow, failing, hanging
or unreachable. A sample that finds `max_pending` others waiting is dropped and counted; every
failed judge call is counted by reason (`telemetry.AUDIT_FAILURE_REASONS`) and its worker goes on.
`stop()` discards what is pending (counted as `shutdown`) and cancels the calls in flight.

Only choice 0 of a request is audited: one judge call per sampled request, whatever its `n`.
Knows nothing about routes or streams: `Accounting` asks `sampled()` when a request is accepted,
keeps the texts of a sampled one (`TextPrefix`) and offers them when the request finishes.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
import orjson

from gateway.prometheus import GatewayMetrics
from gateway.protocol import ChatCompletionRequest, text_parts
from gateway.settings import AuditSettings
from gateway.telemetry import RequestRecord
from safeprompt.judge.model_judge import ModelVerdict, judge_request, read_verdict

logger = logging.getLogger("gateway.audit")

# A judge's answer is a few tokens with their log-probabilities (kilobytes); more is not one.
MAX_ANSWER_BYTES = 1024 * 1024
LOG_EVERY_S = 60.0  # a failing judge is logged once a minute per reason, not once per sample
KEEPALIVE_S = 4.0  # below uvicorn's and vLLM's 5 s keep-alive, as for the upstream pool


@dataclass(frozen=True, slots=True)
class AuditSample:
    """One finished answer waiting for the audit judge."""

    model: str
    variant: str
    live_refusal: bool  # the live judge's verdict on the answer
    request_text: str  # the last user message's text, cut to the judge's max_chars
    answer_text: str  # choice 0's whole text, cut to the judge's max_chars


class TextPrefix:
    """The first `max_chars` characters of a streamed text, kept as its deltas arrive."""

    __slots__ = ("_parts", "_room")

    def __init__(self, max_chars: int) -> None:
        self._parts: list[str] = []
        self._room = max_chars

    def feed(self, delta: str) -> None:
        if self._room > 0:
            delta = delta[: self._room]
            self._parts.append(delta)
            self._room -= len(delta)

    @property
    def text(self) -> str:
        return "".join(self._parts)


def last_user_text(request: ChatCompletionRequest) -> str:
    """The text of the request's last user message (its text parts joined by newlines), "" if none."""
    for message in reversed(request.messages):
        if message.role == "user":
            return "\n".join(text_parts(message.content))
    return ""


class JudgeStatusError(Exception):
    """The judge answered an HTTP status other than 200."""


class Auditor:
    """The audit queue and its workers; started and stopped by the app's lifespan."""

    def __init__(
        self, settings: AuditSettings, metrics: GatewayMetrics, *, draw: Callable[[], float] = random.random
    ) -> None:
        self.settings = settings
        self.judge = settings.judge
        self.max_chars = settings.judge.max_chars
        self.draw = draw  # uniform in [0, 1): a request is sampled when it falls below sample_rate
        self._url = settings.judge.api_base
        self._metrics = metrics
        self._queue: asyncio.Queue[AuditSample] | None = None  # None: not running
        self._workers: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None
        self._judging = 0  # samples taken from the queue and not finished
        self._logged_at: dict[str, float] = {}

    # --- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        """Make the judge's HTTP session and the workers (inside the running event loop). Nothing
        is sent to the judge: an unreachable judge never delays or stops the gateway's start."""
        settings = self.settings
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=settings.concurrency, keepalive_timeout=KEEPALIVE_S),
            timeout=aiohttp.ClientTimeout(total=self.judge.timeout_s),
            headers={"Authorization": f"Bearer {self.judge.api_key.get_secret_value()}"},
            # As for vLLM: no cookies carried between calls, no proxy from the environment.
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        self._queue = asyncio.Queue(maxsize=settings.max_pending)
        self._workers = [
            asyncio.create_task(self._work(self._queue), name=f"audit-{number}")
            for number in range(settings.concurrency)
        ]
        self._show_pending()

    async def stop(self) -> None:
        """Discard the samples still queued and cancel the calls in flight, each counted as
        `shutdown`; close the session. Returns as soon as the workers have unwound."""
        queue, self._queue = self._queue, None  # from here on nothing is sampled or accepted
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        while queue is not None and not queue.empty():
            queue.get_nowait()
            self._metrics.audit_failed("shutdown")
        if self._session is not None:
            await self._session.close()
            self._session = None
        self._show_pending()

    # --- the request's side: synchronous, never raises -----------------------------------------
    def sampled(self) -> bool:
        """Whether the request being accepted is drawn for the audit (`sample_rate` of them).

        Drawn when the request is accepted, not when it ends, so that only drawn requests keep
        their texts; the draw does not depend on the outcome, so the sample is unbiased."""
        return self._queue is not None and self.draw() < self.settings.sample_rate

    def offer(self, record: RequestRecord, request_text: str, answer_text: str) -> None:
        """Queue a sampled request's answer for the audit, if it finished with status 200, no error
        and some answer text; a full queue drops it (counted). Never waits, never raises."""
        try:
            if record.status != 200 or record.error_kind is not None or not answer_text or not record.verdicts:
                return
            queue = self._queue
            if queue is None:
                self._metrics.audit_failed("shutdown")
                return
            sample = AuditSample(
                model=record.model,
                variant=record.variant,
                live_refusal=record.verdicts[0].refusal,
                request_text=request_text[: self.max_chars],
                answer_text=answer_text[: self.max_chars],
            )
            try:
                queue.put_nowait(sample)
            except asyncio.QueueFull:
                self._failed("queue_full")
                return
            self._show_pending()
        except Exception:  # the audit must never fail a request
            logger.exception("audit: offering request %s failed", record.request_id)
            self._metrics.audit_failed("internal")

    # --- the workers ---------------------------------------------------------------------------
    async def _work(self, queue: asyncio.Queue[AuditSample]) -> None:
        while True:
            sample = await queue.get()
            self._judging += 1
            try:
                await self._audit(sample)
            except asyncio.CancelledError:
                self._metrics.audit_failed("shutdown")
                raise
            finally:
                self._judging -= 1
                self._show_pending()

    async def _audit(self, sample: AuditSample) -> None:
        """Judge one sample and count the outcome; every failure but cancellation is counted here."""
        try:
            verdict = await self._ask(sample)
        except TimeoutError:  # before ClientError: aiohttp's timeouts are both
            reason = "timeout"
        except (aiohttp.ClientError, OSError):
            reason = "connect"
        except JudgeStatusError:
            reason = "status"
        except ValueError:  # not JSON (orjson's error is a ValueError), not a completion, too large
            reason = "bad_answer"
        except Exception:
            logger.exception("audit: judging a sample failed")
            reason = "internal"
        else:
            self._metrics.answer_audited(sample.model, sample.variant, live=sample.live_refusal, audit=verdict.label)
            return
        self._failed(reason)

    async def _ask(self, sample: AuditSample) -> ModelVerdict:
        session = self._session
        if session is None:
            raise RuntimeError("the auditor is not started (the app's lifespan starts it)")
        path, body = judge_request(self.judge, sample.request_text, sample.answer_text)
        async with session.post(
            self._url + path,
            data=orjson.dumps(body),
            headers={"Content-Type": "application/json"},
            allow_redirects=False,
        ) as response:
            if response.status != 200:
                raise JudgeStatusError(f"HTTP {response.status}")
            if (response.content_length or 0) > MAX_ANSWER_BYTES:
                raise ValueError("the judge's answer is too large")
            chunks: list[bytes] = []
            size = 0
            while chunk := await response.content.readany():
                size += len(chunk)
                if size > MAX_ANSWER_BYTES:
                    raise ValueError("the judge's answer is too large")
                chunks.append(chunk)
        return read_verdict(self.judge, orjson.loads(b"".join(chunks)))

    # --- counting ------------------------------------------------------------------------------
    def _failed(self, reason: str) -> None:
        self._metrics.audit_failed(reason)
        now = time.monotonic()
        if now - self._logged_at.get(reason, -LOG_EVERY_S) >= LOG_EVERY_S:
            self._logged_at[reason] = now
            logger.warning(
                "audit judge %s: a sample was not judged (%s); counted in "
                "dro_gateway_audit_failures_total, logged once a minute",
                self.judge.name,
                reason,
            )

    def _show_pending(self) -> None:
        queued = self._queue.qsize() if self._queue is not None else 0
        self._metrics.audit_pending.set(queued + self._judging)
