"""Structured request log: one JSON line per request on the logger `gateway.requests`.

`log_request(record, log_prompts=...)` writes what the gateway knows about a finished request
(ids, model, variant, status, error kind, refusal verdicts, token counts, latencies). Prompt text,
answer text and the client's `user` field are personal data: they are written only when the
operator turned prompt logging on. This module knows nothing about HTTP or metrics; where the
lines go is the logging configuration's business (`configure_request_log` is the default: plain
lines on a stream, not propagated to the root logger).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import IO, Any

from gateway.telemetry import RequestRecord

LOGGER_NAME = "gateway.requests"


def _round_s(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def build_log_entry(record: RequestRecord, *, log_prompts: bool) -> dict[str, Any]:
    """The JSON object logged for one request (pure; the tests read it)."""
    entry: dict[str, Any] = {
        "event": "request",
        "ts": round(time.time(), 3),
        "request_id": record.request_id,
        "route": record.route,
        "model": record.model,
        "variant": record.variant,
        "stream": record.stream,
        "status": record.status,
        "error_kind": record.error_kind,
        "judge": record.judge or (record.verdicts[0].judge if record.verdicts else None),
        # One verdict per choice; `refusal` is true when any choice was judged a refusal.
        "refusal": any(verdict.refusal for verdict in record.verdicts) if record.verdicts else None,
        "refusals": [verdict.refusal for verdict in record.verdicts],
        "matched": [verdict.matched for verdict in record.verdicts],
        "prompt_tokens": record.prompt_tokens,
        "soft_prompt_tokens": record.soft_prompt_tokens,
        "completion_tokens": record.completion_tokens,
        "latency_s": _round_s(record.total_s),
        "ttft_s": _round_s(record.first_token_s),
        "upstream_s": _round_s(record.upstream_s),
        "overhead_s": _round_s(record.overhead_s),
    }
    if log_prompts:
        entry["user"] = record.user
        entry["prompt"] = record.prompt_text
        entry["answers"] = record.answer_texts
    return entry


def log_request(record: RequestRecord, *, log_prompts: bool) -> None:
    """Write one JSON line for a finished request on the `gateway.requests` logger."""
    record.finish()
    entry = build_log_entry(record, log_prompts=log_prompts)
    logging.getLogger(LOGGER_NAME).info(json.dumps(entry, ensure_ascii=False, separators=(",", ":")))


def configure_request_log(stream: IO[str] | None = None, level: int = logging.INFO) -> logging.Logger:
    """Send request lines, bare (no logging prefix), to `stream` (stdout by default). Idempotent."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(level)
    logger.propagate = False
    for handler in list(logger.handlers):
        if getattr(handler, "_dro_request_log", False):
            logger.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler._dro_request_log = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    return logger
