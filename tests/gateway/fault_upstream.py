"""A fake vLLM upstream for fault injection only: hangs, 500s, 4xx, and streams that stop or drop
mid-answer — failures a real vLLM cannot be made to produce on demand. The `model` field of the
request picks the behaviour. Also an in-thread uvicorn runner for ASGI apps on loopback."""

from __future__ import annotations

import asyncio
import threading
import time

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


def _chunk(text: str | None, finish: str | None = None) -> bytes:
    delta = {"content": text} if text is not None else {}
    body = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0, "model": "fake",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + orjson.dumps(body) + b"\n\n"


# What the fake saw, for tests: `hang_aborted` counts hanging requests whose client (the gateway)
# closed the connection before the 30 s were up.
SEEN = {"hang_aborted": 0, "drip_aborted": 0, "flood_aborted": 0}


async def chat(request: Request) -> Response:
    body = orjson.loads(await request.body())
    behaviour = body["model"]
    if behaviour == "hang":
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if await request.is_disconnected():
                SEEN["hang_aborted"] += 1
                break
            await asyncio.sleep(0.05)
    if behaviour == "boom":
        return JSONResponse({"error": {"message": "engine died", "type": "InternalServerError"}}, status_code=500)
    if behaviour == "picky":
        return JSONResponse({"error": {"message": "This model's maximum context length is 10 tokens.",
                                       "type": "BadRequestError", "param": "messages", "code": 400}},
                            status_code=400)
    if not body.get("stream"):
        return JSONResponse({"id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": "fake",
                             "choices": [{"index": 0, "finish_reason": "stop",
                                          "message": {"role": "assistant", "content": "I cannot help with that."}}],
                             "usage": {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}})

    if behaviour in ("drip", "flood"):
        return StreamingResponse(_endless(behaviour), media_type="text/event-stream")
    if behaviour == "slow":  # ten chunks 0.2 s apart, then the end: a stream in flight for 2 s
        async def slow():
            for index in range(10):
                yield _chunk(f"{index} ")
                await asyncio.sleep(0.2)
            yield _chunk(None, "stop")
            yield b"data: [DONE]\n\n"

        return StreamingResponse(slow(), media_type="text/event-stream")

    async def events():
        yield _chunk("I cannot ")
        yield _chunk("help")
        if behaviour == "drop":
            raise RuntimeError("connection dropped")  # uvicorn aborts the chunked response
        if behaviour == "stall":
            await asyncio.sleep(30)
        yield _chunk(" with that.", "stop")
        yield b"data: " + orjson.dumps({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0,
                                        "model": "fake", "choices": [],
                                        "usage": {"prompt_tokens": 3, "completion_tokens": 3,
                                                  "total_tokens": 6}}) + b"\n\n"
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


# "drip": a chunk every 0.2 s, forever (each well within any read timeout); "flood": 64 KiB
# chunks as fast as the reader takes them, forever. Both count the reader's hang-up.
FLOOD_TEXT = "x" * 65536


async def _endless(behaviour: str):
    try:
        while True:
            if behaviour == "drip":
                yield _chunk("drop ")
                await asyncio.sleep(0.2)
            else:
                yield _chunk(FLOOD_TEXT)
                await asyncio.sleep(0)
    except (asyncio.CancelledError, GeneratorExit):
        SEEN[f"{behaviour}_aborted"] += 1
        raise


async def health(request: Request) -> Response:
    return Response("ok")


def fault_app() -> Starlette:
    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]),
                             Route("/health", health)])


class ThreadedServer:
    """Run an ASGI app with uvicorn on 127.0.0.1:port in a background thread (real HTTP)."""

    def __init__(self, app, port: int) -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadedServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
