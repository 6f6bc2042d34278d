"""Limits on what one chat request may cost the gateway and vLLM, each refused with a 400 naming it.

- `check_body_shape`: on the raw JSON body, before it is parsed into a request (parsing is where a
  body of 100,000 empty messages or 300 nested levels costs CPU, or fails deep inside a library):
  the nesting depth and the number of messages.
- `check_generation_budget`: on the parsed request, `n` and the tokens it asks vLLM to generate
  at most, n x max_tokens.

The body-size limit (413) is enforced while the body is read (`gateway.completions.read_json_body`),
the response-size limit where vLLM's answer is read (`gateway.upstream.UpstreamResponse.read_json`).
This module knows nothing about HTTP or upstreams; the numbers come from `Settings`.
"""

from __future__ import annotations

from typing import Any

from gateway.errors import InvalidRequest
from gateway.protocol import ChatCompletionRequest


def json_depth_exceeds(value: Any, max_depth: int) -> bool:
    """True when `value` nests deeper than `max_depth` levels (a scalar is 0, `{}` or `[]` is 1).

    Iterative, and stops at the first path that is too deep, so a hostile body cannot make it recurse."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth + 1 > max_depth:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def check_body_shape(body: dict[str, Any], *, max_depth: int, max_messages: int) -> None:
    """Refuse a body nested deeper than `max_depth` or with more than `max_messages` messages (400)."""
    if json_depth_exceeds(body, max_depth):
        raise InvalidRequest(f"request body is nested deeper than {max_depth} levels")
    messages = body.get("messages")
    if isinstance(messages, list) and len(messages) > max_messages:
        raise InvalidRequest(
            f"messages: at most {max_messages} messages per request, got {len(messages)}", param="messages"
        )


def check_generation_budget(
    request: ChatCompletionRequest, *, max_n: int, max_generated_tokens: int, max_logprob_entries: int | None = None
) -> None:
    """Refuse `n` above `max_n`, n x max_tokens above `max_generated_tokens`, and, with logprobs,
    n x max_tokens x (1 + top_logprobs) above `max_logprob_entries` (400).

    `max_completion_tokens` (OpenAI's newer name) is used when given, as vLLM does. Without either,
    vLLM bounds each choice by the model's context length, so only `n` is checked (and the answer's
    size by max_response_bytes)."""
    if request.n > max_n:
        raise InvalidRequest(f"n must be at most {max_n}", param="n")
    max_tokens = request.max_completion_tokens or request.max_tokens
    if max_tokens is not None and request.n * max_tokens > max_generated_tokens:
        param = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
        raise InvalidRequest(
            f"n x {param} = {request.n} x {max_tokens} exceeds this gateway's limit of {max_generated_tokens} "
            "generated tokens per request",
            param=param,
        )
    extra = request.model_extra or {}
    top = extra.get("top_logprobs")
    if max_tokens is not None and max_logprob_entries is not None and extra.get("logprobs") is True:
        per_token = 1 + (top if isinstance(top, int) and not isinstance(top, bool) and top > 0 else 0)
        if request.n * max_tokens * per_token > max_logprob_entries:
            raise InvalidRequest(
                f"n x max_tokens x (1 + top_logprobs) = {request.n} x {max_tokens} x {per_token} exceeds this "
                f"gateway's limit of {max_logprob_entries} logprob entries per request",
                param="top_logprobs" if per_token > 1 else "logprobs",
            )
