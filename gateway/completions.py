"""`POST /v1/chat/completions`: read and check the request, apply the safety prompt, answer.

The route checks the caller's API key (`gateway.auth`, before reading the body), reads the body into
one `ChatCompletionRequest`, resolves the model's variant (and checks the key may use it), builds the
upstream body from it (`gateway.safety.build_upstream_body`) and either relays a whole answer or
hands the stream to `gateway.relay`. Every exception, expected or not, becomes the client's error
through `gateway.errors.to_gateway_error`, with the request id and variant headers. `Accounting`
records the request and is finished exactly once: here, or by the relay once a stream began.
Knows nothing about the HTTP client (the upstream pool raises only gateway errors) or metrics' internals.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

import orjson
from fastapi import Depends, Request
from fastapi.responses import Response

from gateway.accounting import Accounting
from gateway.deadlines import WHOLE_REQUEST, Deadlines, within
from gateway.errors import InvalidRequest, PayloadTooLarge, error_response, to_gateway_error
from gateway.limits import check_body_shape, check_generation_budget
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
    check_generation_budget(
        request,
        max_n=settings.max_n,
        max_generated_tokens=settings.max_generated_tokens,
        max_logprob_entries=settings.max_logprob_entries,
    )
    if request.seed is not None and settings.seed_policy == "reject":
        raise InvalidRequest("per-request seed is disabled on this deployment (seed_policy=reject)", param="seed")
    return resolve_variant(models, request.model, request_id=request_id, user=request.user)


async def create_chat_completion(request: Request, service: Annotated[Service, Depends(get_service)]) -> Response:
    accounting = service.accounting(request_id_for(request), ROUTE)
    request_id = accounting.record.request_id
    deadlines = Deadlines.start(service.settings)
    streaming = False
    try:
        key = service.keys.authenticate(request.headers.get("authorization"))
        settings = service.settings
        raw = await read_json_body(request, settings.max_request_bytes)
        check_body_shape(raw, max_depth=settings.max_json_depth, max_messages=settings.max_messages)
        chat = ChatCompletionRequest.model_validate(raw)
        accounting.parsed(chat)
        model, variant = check_and_resolve(chat, settings, service.models, request_id)
        service.keys.authorize(key, model.name, variant.name)
        accounting.start(chat, model, variant)
        limit_id = key.limit_id if key is not None else None
        service.admission.admit(limit_id)  # 429 here is counted under the model and variant asked for
        accounting.on_finish(lambda record: service.admission.finished(limit_id, record.total_tokens))
        body = build_upstream_body(
            chat,
            model,
            variant,
            policy=settings.system_message_policy,
            extra_fields=key.allowed_extra_fields if key is not None else frozenset(),
        )
        release = await service.admission.acquire()
        try:
            if chat.stream:
                response = await open_stream(
                    service.pool,
                    chat,
                    body,
                    accounting,
                    on_close=release,
                    deadlines=deadlines,
                    write_timeout_s=settings.client_write_timeout_s,
                )
                streaming = True  # the relay finishes the accounting and frees the slot when the stream ends
                return response
            return await unless_client_leaves(
                request,
                within(
                    deadlines.end,
                    complete(service.pool, chat, body, accounting, max_bytes=settings.max_response_bytes),
                    code=WHOLE_REQUEST,
                ),
                accounting,
            )
        finally:
            if not streaming:
                release()
    except Exception as exc:
        error = to_gateway_error(exc)
        accounting.fail(error)
        return error_response(error, headers=accounting.response_headers)
    finally:
        if not streaming:
            accounting.finish()


# Nginx's code for "client closed request": recorded when the client left before its answer was ready.
CLIENT_CLOSED_REQUEST = 499


async def until_disconnected(request: Request) -> None:
    """Return when the client hangs up. Called after the body was read, so the only message left
    for the app to receive is the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_client_leaves(
    request: Request, work: Coroutine[Any, Any, Response], accounting: Accounting
) -> Response:
    """The response `work` makes, unless the client disconnects first: then `work` is cancelled,
    which closes the vLLM request and so makes vLLM abort the generation (a non-streaming answer
    of n x max_tokens would otherwise run to its end for nobody)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(until_disconnected(request))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            accounting.client_disconnected()
            accounting.record.status = CLIENT_CLOSED_REQUEST
    if task.cancelled():
        return Response(status_code=CLIENT_CLOSED_REQUEST)  # nobody reads it
    return task.result()


async def complete(
    pool: UpstreamPool, chat: ChatCompletionRequest, body: dict[str, Any], accounting: Accounting, *, max_bytes: int
) -> Response:
    """A whole answer of at most `max_bytes`: judged per choice, `model` set to the id the client
    asked for, serialised with orjson (the standard library blocks the event loop for seconds on
    answers of tens of MiB)."""
    async with pool.open(ROUTE, body, {"X-Request-Id": accounting.record.request_id}) as upstream:
        payload = await upstream.read_json(max_bytes=max_bytes)
    accounting.answer(payload, upstream_s=upstream.waited_s)
    return Response(
        orjson.dumps({**payload, "model": chat.model}),
        media_type="application/json",
        headers=accounting.response_headers,
    )


async def open_stream(
    pool: UpstreamPool,
    chat: ChatCompletionRequest,
    body: dict[str, Any],
    accounting: Accounting,
    *,
    on_close: Callable[[], None],
    deadlines: Deadlines,
    write_timeout_s: float | None,
) -> Response:
    """Open the vLLM stream before answering, so errors before the first byte keep their status.
    `on_close` runs when the relay has closed the stream (not when opening it fails: the caller
    cleans up then). Opening and the first event share the first-event deadline."""
    first_event = deadlines.first_event()
    close_upstream = contextlib.AsyncExitStack()
    close_upstream.callback(on_close)
    upstream = await within(
        first_event[0],
        close_upstream.enter_async_context(
            pool.open(ROUTE, body, {"X-Request-Id": accounting.record.request_id}, stream=True)
        ),
        code=first_event[1],
    )
    return stream_response(
        upstream,
        close_upstream,
        accounting,
        model_id=chat.model,
        include_usage=chat.wants_usage,
        first_event=first_event,
        end=deadlines.end,
        silence_s=deadlines.silence_s,
        write_timeout_s=write_timeout_s,
    )
