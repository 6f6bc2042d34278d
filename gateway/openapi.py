"""The gateway's OpenAPI document: FastAPI's, plus the chat route's request body and error envelope.

The chat route reads its body itself (size, depth and message limits come before parsing), so
FastAPI cannot see the body's model; `install_openapi(app)` adds `ChatCompletionRequest`'s JSON
schema as the route's request body and the OpenAI error envelope as its 4xx/5xx answers. The
document is what `/openapi.json` serves, and what the schema-driven fuzzing in the tests
(schemathesis) generates requests from.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from gateway.protocol import ChatCompletionRequest

REF = "#/components/schemas/{model}"
ERROR_ENVELOPE: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}


def install_openapi(app: FastAPI, chat_route: str) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=app.version, routes=app.routes)
            body = ChatCompletionRequest.model_json_schema(ref_template=REF)
            schemas = document.setdefault("components", {}).setdefault("schemas", {})
            schemas.update(body.pop("$defs", {}))
            schemas["ChatCompletionRequest"] = body
            schemas["ErrorResponse"] = ERROR_ENVELOPE
            error = {
                "description": "OpenAI error envelope",
                "content": {"application/json": {"schema": {"$ref": REF.format(model="ErrorResponse")}}},
            }
            operation = document["paths"][chat_route]["post"]
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": REF.format(model="ChatCompletionRequest")}}},
            }
            operation["responses"] = {
                "200": {"description": "chat completion, or a text/event-stream of chunks when stream is true"},
                "4XX": error,
                "5XX": error,
            }
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
