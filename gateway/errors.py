"""The gateway's error hierarchy and its one mapping to OpenAI's error envelope.

Every error a client can see is a `GatewayError` subclass, rendered by `error_payload` as
`{"error": {"message", "type", "param", "code"}}` with the right HTTP status, or, inside a stream,
as one `data: {"error": ...}` event followed by `data: [DONE]`. `install_error_handlers` maps
FastAPI's own errors (validation, unknown routes, unexpected exceptions) onto the same envelope,
so no client ever sees a traceback.
"""

from __future__ import annotations

import logging

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("gateway.errors")


class GatewayError(Exception):
    status_code = 500
    error_type = "internal_error"
    code: str | None = None
    kind = "internal"  # telemetry error_kind (gateway.telemetry.ERROR_KINDS)

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class InvalidRequest(GatewayError):
    status_code = 400
    error_type = "invalid_request_error"
    kind = "invalid_request"


class PayloadTooLarge(InvalidRequest):
    status_code = 413
    code = "payload_too_large"


class ModelNotFound(GatewayError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "model_not_found"
    kind = "model_not_found"


class UpstreamRejected(GatewayError):
    """vLLM answered 4xx: passed through with its status and message."""

    error_type = "invalid_request_error"
    kind = "upstream_4xx"

    def __init__(self, message: str, *, status_code: int, param: str | None = None,
                 code: str | None = None, error_type: str | None = None) -> None:
        super().__init__(message, param=param, code=code)
        self.status_code = status_code
        if error_type:
            self.error_type = error_type


class UpstreamFailed(GatewayError):
    status_code = 502
    error_type = "upstream_error"
    kind = "upstream_5xx"


class UpstreamUnavailable(GatewayError):
    status_code = 503
    error_type = "service_unavailable"
    code = "upstream_unavailable"
    kind = "upstream_unavailable"


class UpstreamTimeout(GatewayError):
    status_code = 504
    error_type = "timeout"
    code = "upstream_timeout"
    kind = "upstream_timeout"


class UpstreamDisconnected(UpstreamFailed):
    code = "upstream_disconnected"
    kind = "upstream_disconnect"


def error_payload(error: GatewayError) -> dict:
    return {"error": {"message": error.message, "type": error.error_type, "param": error.param,
                      "code": error.code}}


def error_response(error: GatewayError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_payload(error), status_code=error.status_code, headers=headers)


def error_sse(error: GatewayError) -> bytes:
    """The end of a failed stream: one error event, then [DONE]."""
    return b"data: " + orjson.dumps(error_payload(error)) + b"\n\ndata: [DONE]\n\n"


def install_error_handlers(app: FastAPI) -> None:
    """Map every exception that can reach FastAPI onto the OpenAI envelope (the one place)."""

    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, exc: GatewayError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"msg": "invalid request", "loc": ()}
        param = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or None
        return error_response(InvalidRequest(str(first.get("msg")), param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = GatewayError(str(exc.detail))
        error.status_code = exc.status_code
        error.error_type = "invalid_request_error" if exc.status_code < 500 else "internal_error"
        error.code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(error, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # The traceback stays in the server log; the client gets a generic message.
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(GatewayError("internal error in the gateway"))
