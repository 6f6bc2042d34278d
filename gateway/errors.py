"""The gateway's error hierarchy and its one mapping from exceptions to OpenAI's error envelope.

Every error a client can see is a `GatewayError`, rendered as `{"error": {"message", "type", "param",
"code"}}` with its HTTP status, or, inside a stream, as one `data: {"error": ...}` event followed by
`data: [DONE]`. `to_gateway_error` is the one place that decides which `GatewayError` an exception
becomes: gateway errors stay themselves, pydantic and FastAPI validation errors become 400, Starlette's
routing errors keep their status, and anything else is a gateway bug: 500 with a generic message
(kind `internal`), its traceback in the server log only. The chat route, the stream relay and the
app's exception handlers all go through it. This module knows nothing about upstreams or metrics.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.sse import DONE_EVENT, encode_event

logger = logging.getLogger("gateway.errors")


class GatewayError(Exception):
    """An error a client may see; the base class is the generic 500 for gateway bugs."""

    status_code = 500
    error_type = "internal_error"
    code: str | None = None
    kind = "internal"  # telemetry error_kind (gateway.telemetry.ERROR_KINDS)
    headers: dict[str, str] | None = None

    def __init__(
        self, message: str, *, param: str | None = None, code: str | None = None, retry_after_s: int | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if retry_after_s is not None:  # whole seconds, at least 1
            self.headers = {**(self.headers or {}), "Retry-After": str(max(1, retry_after_s))}


class InvalidRequest(GatewayError):
    status_code = 400
    error_type = "invalid_request_error"
    kind = "invalid_request"


class PayloadTooLarge(InvalidRequest):
    status_code = 413
    code = "payload_too_large"


class Unauthorized(GatewayError):
    """No API key, or one the gateway does not know (401)."""

    status_code = 401
    error_type = "invalid_request_error"
    code = "invalid_api_key"
    kind = "unauthorized"
    headers = {"WWW-Authenticate": "Bearer"}


class Forbidden(GatewayError):
    """A known API key asked for a model or variant it is not granted (403)."""

    status_code = 403
    error_type = "permission_error"
    code = "model_not_granted"
    kind = "forbidden"


class ModelNotFound(GatewayError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "model_not_found"
    kind = "model_not_found"


class RouteNotServed(GatewayError):
    """An unknown path or a method a route does not take (Starlette's HTTPException)."""

    def __init__(self, exc: StarletteHTTPException) -> None:
        super().__init__(str(exc.detail), code={404: "not_found", 405: "method_not_allowed"}.get(exc.status_code))
        self.status_code = exc.status_code
        self.error_type = "invalid_request_error" if exc.status_code < 500 else "internal_error"
        self.kind = "invalid_request" if exc.status_code < 500 else "internal"
        self.headers = dict(exc.headers) if exc.headers else None


class UpstreamRejected(GatewayError):
    """vLLM answered 4xx: passed through with its status and message."""

    error_type = "invalid_request_error"
    kind = "upstream_4xx"

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        param: str | None = None,
        code: str | None = None,
        error_type: str | None = None,
    ) -> None:
        super().__init__(message, param=param, code=code)
        self.status_code = status_code
        if error_type:
            self.error_type = error_type


class UpstreamFailed(GatewayError):
    status_code = 502
    error_type = "upstream_error"
    kind = "upstream_5xx"


class UpstreamResponseTooLarge(UpstreamFailed):
    """vLLM's whole answer exceeds `max_response_bytes`: a limit of the gateway, not a vLLM fault."""

    code = "response_too_large"
    kind = "response_too_large"


class UpstreamUnavailable(GatewayError):
    status_code = 503
    error_type = "service_unavailable"
    code = "upstream_unavailable"
    kind = "upstream_unavailable"


class GatewayOverloaded(GatewayError):
    """Local overload: every pooled connection to vLLM is busy (503 with Retry-After). Not an
    upstream fault: vLLM stays marked healthy."""

    status_code = 503
    error_type = "service_unavailable"
    code = "overloaded"
    kind = "overloaded"
    headers = {"Retry-After": "1"}


class RateLimited(GatewayError):
    """The API key is over its requests or tokens per minute (429 with Retry-After)."""

    status_code = 429
    error_type = "rate_limit_error"
    code = "rate_limit_exceeded"
    kind = "rate_limited"


class UpstreamTimeout(GatewayError):
    status_code = 504
    error_type = "timeout"
    code = "upstream_timeout"
    kind = "upstream_timeout"


class DeadlineExceeded(GatewayError):
    """The request's deadline passed: no first event from vLLM within first_byte_timeout_s, or no
    end within request_timeout_s (504; mid-stream, an error event). vLLM's request is closed."""

    status_code = 504
    error_type = "timeout"
    code = "request_deadline"
    kind = "deadline_exceeded"


class UpstreamDisconnected(UpstreamFailed):
    code = "upstream_disconnected"
    kind = "upstream_disconnect"


def to_gateway_error(exc: Exception) -> GatewayError:
    """The error the client sees for any exception (the one mapping)."""
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, (ValidationError, RequestValidationError)):
        return _invalid_fields(exc.errors())
    if isinstance(exc, StarletteHTTPException):
        return RouteNotServed(exc)
    # A bug in the gateway: the traceback stays in the server log, the client gets a generic message.
    logger.error("unexpected error in the gateway", exc_info=exc)
    return GatewayError("internal error in the gateway")


def _invalid_fields(errors: Sequence[Any]) -> InvalidRequest:
    """400 naming the first invalid field as `param` (dotted path; FastAPI's `body` prefix dropped)."""
    first = errors[0] if errors else {"msg": "invalid request", "loc": ()}
    param = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or None
    message = str(first.get("msg"))
    return InvalidRequest(f"{param}: {message}" if param else message, param=param)


def error_payload(error: GatewayError) -> dict[str, Any]:
    return {"error": {"message": error.message, "type": error.error_type, "param": error.param, "code": error.code}}


def error_response(error: GatewayError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        error_payload(error),
        status_code=error.status_code,
        headers={**(error.headers or {}), **(headers or {})} or None,
    )


def error_sse(error: GatewayError) -> bytes:
    """The end of a failed stream: one error event, then [DONE]."""
    return encode_event(error_payload(error)) + DONE_EVENT


async def handle_exception(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI exception handler: whatever reached the app, as an OpenAI envelope."""
    return error_response(to_gateway_error(exc))


def install_error_handlers(app: FastAPI) -> None:
    """Route every exception that can reach FastAPI through `handle_exception`.

    Starlette looks handlers up by class, and the `Exception` one only runs in its outermost
    middleware, so each family is registered explicitly; all share the one mapping."""
    for exc_class in (GatewayError, RequestValidationError, StarletteHTTPException, Exception):
        app.add_exception_handler(exc_class, handle_exception)
