"""`POST /v1/chat/completions`: validate, apply the safety prompt, relay to vLLM, judge, record.

Non-streaming answers are judged per choice on the whole text. Streamed answers are relayed chunk by
chunk and judged incrementally (`StreamVerdict`); the verdicts are counted exactly once when the
stream ends, whether it ended normally, the client went away, or vLLM failed mid-stream (then the
client gets one error event and `data: [DONE]`). Knows nothing about metrics' internals: it fills
a `RequestRecord` and hands it to `finish_request` once.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

import httpx
import orjson
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from gateway.errors import (
    GatewayError,
    InvalidRequest,
    PayloadTooLarge,
    UpstreamDisconnected,
    UpstreamTimeout,
    error_response,
    error_sse,
)
from safeprompt.judge import Judge, StreamVerdict
from gateway.protocol import ChatCompletionRequest
from gateway.request_log import log_request
from gateway.splice import apply_safety_prompt, check_client_input
from gateway.telemetry import RequestRecord
from gateway.variants import ServedModel, Variant, resolve_variant

ROUTE = "/v1/chat/completions"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


@dataclass
class Prepared:
    request: ChatCompletionRequest
    model: ServedModel
    variant: Variant
    body: dict[str, Any]          # what vLLM receives
    client_wants_usage: bool


def request_id_for(request: Request) -> str:
    """The client's X-Request-Id when it is a safe token, else a fresh one (propagated to vLLM)."""
    given = request.headers.get("x-request-id", "")
    return given if _REQUEST_ID.match(given) else uuid.uuid4().hex


async def read_json_body(request: Request, max_bytes: int) -> dict[str, Any]:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLarge(f"request body exceeds {max_bytes} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise PayloadTooLarge(f"request body exceeds {max_bytes} bytes")
        chunks.append(chunk)
    try:
        body = orjson.loads(b"".join(chunks))
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    return body


def parse_request(raw: dict[str, Any]) -> ChatCompletionRequest:
    try:
        return ChatCompletionRequest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        raise InvalidRequest(f"{param}: {first['msg']}" if param else first["msg"], param=param) from None


def prepare(raw: dict[str, Any], request: ChatCompletionRequest, record: RequestRecord,
            state: Any) -> Prepared:
    settings = state.settings
    check_client_input(request, raw)
    if request.n > settings.max_n:
        raise InvalidRequest(f"n must be at most {settings.max_n}", param="n")
    if request.seed is not None and settings.seed_policy == "reject":
        raise InvalidRequest("per-request seed is disabled on this deployment (seed_policy=reject)", param="seed")
    model, variant = resolve_variant(state.models, request.model, request_id=record.request_id,
                                     user=request.user)
    messages = apply_safety_prompt(
        raw["messages"], kind=variant.kind, text=variant.text, encoded_embeds=variant.encoded_embeds,
        policy=settings.system_message_policy)
    body = {key: value for key, value in raw.items() if key not in ("model", "messages")}
    body["model"] = model.upstream_name
    body["messages"] = messages
    client_wants_usage = bool(request.stream_options and request.stream_options.include_usage)
    if request.stream:
        # Always ask vLLM for usage so token metrics work; stripped again if the client did not ask.
        body["stream_options"] = {**(raw.get("stream_options") or {}), "include_usage": True}
    return Prepared(request, model, variant, body, client_wants_usage)


def response_headers(record: RequestRecord) -> dict[str, str]:
    return {"X-Request-Id": record.request_id, "X-Safety-Variant": record.variant}


def finish_request(state: Any, record: RequestRecord) -> None:
    record.finish()
    state.metrics.request_finished(record)
    log_request(record, log_prompts=state.settings.log_prompts)


async def create_chat_completion(request: Request) -> Response:
    state = request.app.state
    record = RequestRecord(request_id=request_id_for(request), route=ROUTE, judge=state.judge.name)
    handed_to_stream = False
    try:
        raw = await read_json_body(request, state.settings.max_request_bytes)
        parsed = parse_request(raw)
        record.stream = parsed.stream
        prepared = prepare(raw, parsed, record, state)
        record.model, record.variant = prepared.model.name, prepared.variant.name
        record.soft_prompt_tokens = prepared.variant.num_virtual_tokens
        record.user = parsed.user
        if state.settings.log_prompts:
            record.prompt_text = orjson.dumps(raw["messages"]).decode()
        state.metrics.request_started(record.model, record.variant, ROUTE)
        record.in_flight = True
        if parsed.stream:
            response = await open_stream(state, prepared, record)
            handed_to_stream = True
            return response
        return await complete(state, prepared, record)
    except GatewayError as error:
        record.status, record.error_kind = error.status_code, error.kind
        return error_response(error, headers=response_headers(record))
    finally:
        if not handed_to_stream:
            finish_request(state, record)


async def complete(state: Any, prepared: Prepared, record: RequestRecord) -> Response:
    headers = {"X-Request-Id": record.request_id}
    async with state.pool.open(ROUTE, prepared.body, headers) as (upstream, waited):
        started = time.perf_counter()
        try:
            payload = orjson.loads(await upstream.aread())
        except httpx.ReadTimeout:
            raise UpstreamTimeout("vLLM did not finish the answer in time") from None
        except (httpx.HTTPError, orjson.JSONDecodeError):
            raise UpstreamDisconnected("vLLM closed the connection before the answer was complete") from None
        record.upstream_s = waited + time.perf_counter() - started
    payload["model"] = prepared.request.model
    answers = []
    for choice in payload.get("choices") or []:
        text = (choice.get("message") or {}).get("content") or ""
        answers.append(text)
        record.verdicts.append(state.judge.judge(text))
    usage = payload.get("usage") or {}
    record.prompt_tokens, record.completion_tokens = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if state.settings.log_prompts:
        record.answer_texts = answers
    return JSONResponse(payload, headers=response_headers(record))


class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that always closes its body generator, so the generator's cleanup
    (closing the vLLM stream, which aborts generation, and counting the answer) runs promptly when
    the client disconnects, not whenever the generator is garbage-collected."""

    async def __call__(self, scope, receive, send) -> None:  # type: ignore[override]
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


async def open_stream(state: Any, prepared: Prepared, record: RequestRecord) -> Response:
    """Open the vLLM stream before answering, so errors before the first byte keep their status."""
    stack = contextlib.AsyncExitStack()
    upstream, waited = await stack.enter_async_context(
        state.pool.open(ROUTE, prepared.body, {"X-Request-Id": record.request_id}))
    record.upstream_s += waited
    return ClosingStreamingResponse(
        relay_stream(state, prepared, record, upstream, stack),
        media_type="text/event-stream",
        headers={**response_headers(record), "Cache-Control": "no-cache"},
    )


async def relay_stream(state: Any, prepared: Prepared, record: RequestRecord, upstream: httpx.Response,
                       stack: contextlib.AsyncExitStack) -> AsyncIterator[bytes]:
    judge: Judge = state.judge
    verdicts: dict[int, StreamVerdict] = {}
    answers: dict[int, list[str]] = {}
    lines = upstream.aiter_lines()
    saw_done = False
    try:
        while True:
            waiting = time.perf_counter()
            try:
                line = await anext(lines)
            except StopAsyncIteration:
                break
            finally:
                record.upstream_s += time.perf_counter() - waiting
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                saw_done = True
                yield b"data: [DONE]\n\n"
                break
            chunk = orjson.loads(data)
            if "error" in chunk:
                record.error_kind = "upstream_5xx"
                yield b"data: " + orjson.dumps(chunk) + b"\n\n"
                continue
            for choice in chunk.get("choices") or []:
                delta = choice.get("delta") or {}
                text = delta.get("content")
                index = int(choice.get("index", 0))
                if text or delta.get("tool_calls"):
                    if record.first_token_s is None:
                        record.first_token_s = time.perf_counter() - record.started_s
                if text:
                    verdicts.setdefault(index, StreamVerdict(judge)).feed(text)
                    if state.settings.log_prompts:
                        answers.setdefault(index, []).append(text)
            usage = chunk.get("usage")
            if usage:
                record.prompt_tokens = usage.get("prompt_tokens")
                record.completion_tokens = usage.get("completion_tokens")
            if not prepared.client_wants_usage:
                if not chunk.get("choices"):
                    continue  # the usage-only chunk the gateway asked for
                chunk.pop("usage", None)
            chunk["model"] = prepared.request.model
            yield b"data: " + orjson.dumps(chunk) + b"\n\n"
        if not saw_done:
            raise UpstreamDisconnected("vLLM ended the stream before it was complete")
    except (asyncio.CancelledError, GeneratorExit):
        record.error_kind = "client_disconnect"
        raise
    except GatewayError as error:
        record.error_kind = error.kind
        yield error_sse(error)
    except httpx.ReadTimeout:
        record.error_kind = UpstreamTimeout.kind
        yield error_sse(UpstreamTimeout("vLLM stopped sending in the middle of the answer"))
    except (httpx.HTTPError, orjson.JSONDecodeError):
        record.error_kind = UpstreamDisconnected.kind
        yield error_sse(UpstreamDisconnected("vLLM dropped the connection in the middle of the answer"))
    finally:
        await stack.aclose()
        for index in range(prepared.request.n):
            stream_verdict = verdicts.get(index)
            record.verdicts.append(stream_verdict.verdict() if stream_verdict else judge.judge(""))
        if state.settings.log_prompts:
            record.answer_texts = ["".join(answers.get(i, [])) for i in range(len(record.verdicts))]
        finish_request(state, record)
