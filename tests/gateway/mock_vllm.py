"""The chat route in-process: the real app with its upstream replaced by an httpx `MockTransport`
(no network, no server), a mock vLLM that records every body it receives, and small helpers to
post requests and read answers, streams and metrics."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import orjson
from fastapi.testclient import TestClient

from gateway.app import build_app
from gateway.service import Service
from gateway.settings import ModelConfig, Settings

UPSTREAM = "http://vllm.test"
ROUTE = "/v1/chat/completions"
Handler = Callable[[httpx.Request], httpx.Response]


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


def sse(parts: list[bytes], fail: Exception | None = None) -> httpx.Response:
    async def body() -> AsyncIterator[bytes]:
        for part in parts:
            yield part
        if fail is not None:
            raise fail
    return httpx.Response(200, content=body(), headers={"Content-Type": "text/event-stream"})


class Upstream:
    """The mock vLLM: answers /health, records every chat body it gets, answers with `chat`."""

    def __init__(self, chat: Handler) -> None:
        self.chat = chat
        self.bodies: list[dict] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            return httpx.Response(200)
        self.bodies.append(orjson.loads(request.content))
        return self.chat(request)


def start_gateway(running: contextlib.ExitStack, chat: Handler, *, model: dict[str, Any] | None = None,
                  **settings: Any) -> tuple[TestClient, Service, Upstream]:
    """The gateway (lifespan included, closed with `running`) serving model `tiny` (default variant
    `short`, fields of `model` added) in front of a mock vLLM answering `chat`."""
    upstream = Upstream(chat)
    config = ModelConfig(**{"name": "tiny", "upstream_model": "tiny-llama", "default_variant": "short", **(model or {})})
    app = build_app(Settings(upstream_urls=[UPSTREAM], judge="paper", models=[config], **settings),
                    transport=httpx.MockTransport(upstream))
    client = running.enter_context(TestClient(app))
    return client, app.state.service, upstream


def ok(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json=answer("Bread needs flour."))


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
