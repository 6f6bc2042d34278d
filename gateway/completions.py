"""`POST /v1/chat/completions`: read and check the request, apply the safety prompt, answer.

The route reads the body into one `ChatCompletionRequest`, resolves the model's variant, builds the
upstream body from it (`gateway.safety.build_upstream_body`) and either relays a whole answer or
hands the stream to `gateway.relay`. Every exception, expected or not, becomes the client's error
through `gateway.errors.to_gateway_error`, with the request id and variant headers. `Accounting`
records the request and is finished exactly once: here, or by the relay once a stream began.
Knows nothing about httpx (the upstream pool raises only gateway errors) or metrics' internals.
"""

from __future__ import annotations

import contextlib
import re
import uuid
from typing import Annotated, Any

import orjson
from fastapi import Depends, Request
from fastapi.responses import JSONResponse, Response

from gateway.accounting import Accounting
from gateway.errors import InvalidRequest, PayloadTooLarge, error_response, to_gateway_error
from gateway.protocol import ChatCompletionRequest
from gateway.relay import stream_response
from gateway.safety import build_upstream_body, check_client_input
from gateway.service import Service, get_service
from gateway.settings import Settings
from gateway.upstream import UpstreamPool
from gateway.variants import ServedModel, Variant, resolve_variant

ROUTE = "/v1/chat/completions"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def request_id_for(request: Request) -> str:
    """The client's X-Request-Id when it is a safe token, else a fresh one (propagated to vLLM)."""
    given = request.headers.get("x-request-id", "")
    return given if _REQUEST_ID.match(given) else uuid.uuid4().hex


async def read_json_body(request: Request, max_bytes: int) -> dict[str, Any]:
    """The body as a JSON object; 413 past `max_bytes` (declared or streamed), 400 if not JSON."""
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


def check_and_resolve(
    request: ChatCompletionRequest, settings: Settings, models: dict[str, ServedModel], request_id: str
) -> tuple[ServedModel, Variant]:
    """Refuse what this deployment does not accept (400), then resolve the variant (404 if unknown)."""
    check_client_input(request)
    if request.n > settings.max_n:
        raise InvalidRequest(f"n must be at most {settings.max_n}", param="n")
    if request.seed is not None and settings.seed_policy == "reject":
        raise InvalidRequest("per-request seed is disabled on this deployment (seed_policy=reject)", param="seed")
    return resolve_variant(models, request.model, request_id=request_id, user=request.user)


async def create_chat_completion(request: Request, service: Annotated[Service, Depends(get_service)]) -> Response:
    accounting = service.accounting(request_id_for(request), ROUTE)
    request_id = accounting.record.request_id
    streaming = False
    try:
        chat = ChatCompletionRequest.model_validate(await read_json_body(request, service.settings.max_request_bytes))
        accounting.parsed(chat)
        model, variant = check_and_resolve(chat, service.settings, service.models, request_id)
        accounting.start(chat, model, variant)
        body = build_upstream_body(chat, model, variant, policy=service.settings.system_message_policy)
        if chat.stream:
            response = await open_stream(service.pool, chat, body, accounting)
            streaming = True  # the relay finishes the accounting when the stream ends
            return response
        return await complete(service.pool, chat, body, accounting)
    except Exception as exc:
        error = to_gateway_error(exc)
        accounting.fail(error)
        return error_response(error, headers=accounting.response_headers)
    finally:
        if not streaming:
            accounting.finish()


async def complete(
    pool: UpstreamPool, chat: ChatCompletionRequest, body: dict[str, Any], accounting: Accounting
) -> Response:
    """A whole answer: judged per choice, `model` set to the id the client asked for."""
    async with pool.open(ROUTE, body, {"X-Request-Id": accounting.record.request_id}) as upstream:
        payload = await upstream.read_json()
    accounting.answer(payload, upstream_s=upstream.waited_s)
    return JSONResponse({**payload, "model": chat.model}, headers=accounting.response_headers)


async def open_stream(
    pool: UpstreamPool, chat: ChatCompletionRequest, body: dict[str, Any], accounting: Accounting
) -> Response:
    """Open the vLLM stream before answering, so errors before the first byte keep their status."""
    close_upstream = contextlib.AsyncExitStack()
    upstream = await close_upstream.enter_async_context(
        pool.open(ROUTE, body, {"X-Request-Id": accounting.record.request_id})
    )
    return stream_response(upstream, close_upstream, accounting, model_id=chat.model, include_usage=chat.wants_usage)
