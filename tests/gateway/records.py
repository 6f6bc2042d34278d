"""A finished request's `RequestRecord` with typical values, for the metrics and request-log tests."""

from __future__ import annotations

from typing import Any

from gateway.telemetry import RequestRecord

ROUTE = "/v1/chat/completions"


def record(**fields: Any) -> RequestRecord:
    base: dict[str, Any] = dict(
        request_id="r1", route=ROUTE, model="smollm2", variant="dro", started_s=0.0, first_token_s=0.2,
        upstream_s=0.9, total_s=1.0, prompt_tokens=40, completion_tokens=12, soft_prompt_tokens=23,
        judge="phrases", in_flight=True)
    base.update(fields)
    return RequestRecord(**base)
