"""The chat route in-process: the real app (in Starlette's TestClient, no server of its own) in front
of a scripted mock vLLM over real HTTP on loopback (tests/gateway/scripted_upstream.py) that records
every chat body it receives, and small helpers to post requests and read answers, streams and
metrics."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, Literal

import httpx
import orjson
from fastapi.testclient import TestClient

from gateway.app import build_app
from gateway.service import Service
from gateway.settings import ModelConfig, Settings
from tests.gateway.scripted_upstream import Received, Reply, ScriptedUpstream

ROUTE = "/v1/chat/completions"
Handler = Callable[[Received], Reply]


def answer(text: str) -> dict:
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "tiny-llama",
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11}}


def chunk(text: str | None, usage: dict | None = None) -> bytes:
    body: dict = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "tiny-llama",
                  "choices": [] if text is None else [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
    if usage:
        body["usage"] = usage
    return b"data: " + orjson.dumps(body) + b"\n\n"


def sse(parts: list, then: Literal["end", "drop", "stall"] = "end") -> Reply:
    """An SSE stream of `parts`, each its own write, then the end (or a drop, or silence)."""
    return Reply(parts=parts, then=then)


class Upstream:
    """The mock vLLM's script: answers /health, records every chat body it gets, answers with `chat`."""

    def __init__(self, chat: Handler) -> None:
        self.chat = chat
        self.bodies: list[dict] = []

    def __call__(self, request: Received) -> Reply:
        if request.path == "/health":
            return Reply(200)
        self.bodies.append(request.json())
        return self.chat(request)


def gateway_settings(upstream_url: str, *, model: dict[str, Any] | None = None, **settings: Any) -> Settings:
    """Settings serving model `tiny` (default variant `short`, fields of `model` added) from `upstream_url`."""
    config = ModelConfig(**{"name": "tiny", "upstream_model": "tiny-llama", "default_variant": "short", **(model or {})})
    return Settings(upstream_urls=[upstream_url], judge="paper", models=[config], **settings)


def start_gateway(running: contextlib.ExitStack, chat: Handler, *, model: dict[str, Any] | None = None,
                  **settings: Any) -> tuple[TestClient, Service, Upstream]:
    """The gateway (lifespan included, closed with `running`) serving model `tiny` (default variant
    `short`, fields of `model` added) in front of a mock vLLM on loopback answering `chat`."""
    upstream = Upstream(chat)
    server = running.enter_context(ScriptedUpstream(upstream))
    app = build_app(gateway_settings(server.url, model=model, **settings))
    client = running.enter_context(TestClient(app))
    return client, app.state.service, upstream


def ok(request: Received) -> Reply:
    return Reply(json=answer("Bread needs flour."))


def sample(service: Service, name: str, **labels: str) -> float | None:
    return service.metrics.registry.get_sample_value(name, {"model": "tiny", "variant": "short", **labels})


def post(client: TestClient, headers: dict[str, str] | None = None, **fields: Any) -> httpx.Response:
    return client.post(ROUTE, json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **fields},
                       headers={"X-Request-Id": "req-1", **(headers or {})})


def events(response: httpx.Response) -> list[str]:
    return [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]


def error_of(response: httpx.Response) -> dict:
    """The OpenAI error envelope's body, checked to have exactly its four fields."""
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error
