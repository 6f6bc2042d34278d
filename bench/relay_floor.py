"""The cheapest streaming relay this stack can be: a floor for the gateway's relay (docs/performance.md, 4).

A bare ASGI app under the same server as the gateway (uvicorn with uvloop and httptools) and the same
upstream client (aiohttp): it posts the client's body to the upstream and writes each network read
of the answer to the client as it is, with no parsing, no judge, no metrics, no deadlines and no
authentication. What it costs per relayed event is what any relay built from these parts costs;
`bench/gateway_overhead.py --floor` measures it beside the gateway in the same run.

    FLOOR_UPSTREAM=http://127.0.0.1:PORT python -m uvicorn bench.relay_floor:app --port P

`FLOOR_MODE=starlette` relays through Starlette's StreamingResponse instead of raw ASGI sends (what
the gateway uses), so the two floors separate the framework's share.
Never used by the product.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from starlette.responses import StreamingResponse

UPSTREAM = os.environ.get("FLOOR_UPSTREAM", "http://127.0.0.1:8001").rstrip("/")
MODE = os.environ.get("FLOOR_MODE", "raw")
_session: aiohttp.ClientSession | None = None


async def _body(receive: Any) -> bytes:
    parts = []
    while True:
        message = await receive()
        parts.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(parts)


async def app(scope: dict, receive: Any, send: Any) -> None:
    global _session
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                _session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if _session is not None:
                    await _session.close()
                await send({"type": "lifespan.shutdown.complete"})
                return
    assert _session is not None
    body = await _body(receive)
    if scope["path"] == "/health":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
        return
    async with _session.post(f"{UPSTREAM}{scope['path']}", data=body,
                             headers={"content-type": "application/json"}) as upstream:
        headers = [(b"content-type", upstream.headers.get("content-type", "application/json").encode())]
        if MODE == "starlette":
            async def reads() -> AsyncIterator[bytes]:
                while data := await upstream.content.readany():
                    yield data

            await StreamingResponse(reads(), status_code=upstream.status, headers=dict(
                (k.decode(), v.decode()) for k, v in headers))(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": upstream.status, "headers": headers})
        while data := await upstream.content.readany():
            await send({"type": "http.response.body", "body": data, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
