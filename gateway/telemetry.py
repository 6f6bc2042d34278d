"""What the gateway records about each request, for metrics and logs.

The chat route's `Accounting` (`gateway/accounting.py`) fills one `RequestRecord` per request and
hands it, exactly once, to `GatewayMetrics.request_finished` (`gateway/prometheus.py`) and
`request_log.log_request`. This module holds data only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from safeprompt.judge import Verdict

# Bounded label values for `error_kind` (never free text: these become Prometheus labels).
ERROR_KINDS = (
    "invalid_request",  # 400 from the gateway's own validation
    "unauthorized",  # 401: no API key or an unknown one
    "forbidden",  # 403: the key is not granted the model or variant
    "model_not_found",  # 404
    "upstream_4xx",  # vLLM rejected the request (passed through)
    "upstream_5xx",  # vLLM failed
    "upstream_unavailable",  # cannot connect / no healthy upstream (503)
    "overloaded",  # 503 + Retry-After: concurrency cap's queue full or wait timed out, or no free pooled connection
    "rate_limited",  # 429: the API key is over its requests or tokens per minute
    "upstream_timeout",  # 504
    "upstream_disconnect",  # upstream dropped mid-stream
    "client_disconnect",  # client went away before the answer ended
    "client_too_slow",  # a streaming client did not read for client_write_timeout_s: the stream was cut
    "deadline_exceeded",  # 504, or an error event mid-stream: first_byte_timeout_s or request_timeout_s passed
    "response_too_large",  # vLLM's whole answer exceeded max_response_bytes (502)
    "internal",  # a bug in the gateway (500, logged with traceback server-side only)
)

# Bounded label values for the audit's failures (gateway.audit): why a sampled answer was not judged.
AUDIT_FAILURE_REASONS = (
    "queue_full",  # max_pending answers were already waiting: the sample was dropped
    "shutdown",  # the gateway stopped before the sample was judged
    "connect",  # the judge could not be reached, or dropped the connection
    "timeout",  # no whole answer within the judge's timeout_s
    "status",  # the judge answered an HTTP status other than 200
    "bad_answer",  # not JSON, not an OpenAI-shaped completion, or too large
    "internal",  # a bug in the gateway's audit (logged with its traceback)
)


@dataclass
class RequestRecord:
    request_id: str
    route: str  # e.g. "/v1/chat/completions"
    model: str = "unknown"  # served model name (bare), "unknown" before resolution
    variant: str = "unknown"  # safety-prompt variant applied
    stream: bool = False
    status: int = 200  # HTTP status sent (200 for streams that failed later)
    # True once GatewayMetrics.request_started was called for this request (after the model and
    # variant were resolved); request_finished decrements the in-flight gauge only then.
    in_flight: bool = False
    accounted: bool = False  # set by GatewayMetrics once counted (exactly once)
    error_kind: str | None = None  # one of ERROR_KINDS
    started_s: float = field(default_factory=time.perf_counter)
    first_token_s: float | None = None  # seconds from start to the first content token
    upstream_s: float = 0.0  # seconds spent waiting on vLLM (connect + bytes)
    total_s: float | None = None  # seconds from start to the last byte sent
    prompt_tokens: int | None = None  # as vLLM counts them: soft-prompt rows included
    completion_tokens: int | None = None
    soft_prompt_tokens: int = 0  # rows of the soft prompt in this request
    verdicts: list[Verdict] = field(default_factory=list)  # one per choice
    judge: str = ""
    user: str | None = None  # never a metric label; logged only if configured
    prompt_text: str | None = None  # set only when prompt logging is enabled
    answer_texts: list[str] | None = None  # set only when prompt logging is enabled

    @property
    def total_tokens(self) -> int:
        """Prompt + completion tokens as vLLM counted them (0 when unknown)."""
        return (self.prompt_tokens or 0) + (self.completion_tokens or 0)

    def finish(self) -> None:
        if self.total_s is None:
            self.total_s = time.perf_counter() - self.started_s

    @property
    def overhead_s(self) -> float | None:
        """Time the gateway itself added: total minus time waiting on the upstream."""
        if self.total_s is None:
            return None
        return max(0.0, self.total_s - self.upstream_s)
