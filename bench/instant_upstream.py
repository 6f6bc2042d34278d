"""An OpenAI-compatible chat server that answers at once, so that what a benchmark measures in front
of it is the proxy's own cost (issue 12, docs/performance.md).

    python bench/instant_upstream.py --port 8101

- `POST /v1/chat/completions`: a non-streaming answer, or, with `"stream": true`, the whole SSE
  stream written in one go, shaped as vLLM writes it (chat.completion.chunk objects, a final chunk
  with `finish_reason`, a usage chunk when `stream_options.include_usage` is set, `[DONE]`). The
  answer has `max_tokens` tokens (default 8), so a client sets the stream's length per request.
- `GET /health`, `GET /v1/models`: what the gateway's health probe and LiteLLM ask for.

With `--pace-ms P` (P > 0) a stream is written as vLLM writes it, one event per write, each flushed and
followed by a pause of P milliseconds, so a proxy reads the events one by one instead of many at once.

It parses no JSON: the few fields it needs are found with a regular expression over the body (a
soft prompt's base64 cannot contain a quote), so its own cost does not grow with a soft prompt's
size beyond reading the bytes. HTTP/1.1 with keep-alive on raw asyncio (uvloop when installed); one
process, one core at most. It counts requests and soft-prompt requests for checks (`GET /stats`).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import time

import orjson

STREAM = re.compile(rb'"stream"\s*:\s*true')
USAGE = re.compile(rb'"include_usage"\s*:\s*true')
MAX_TOKENS = re.compile(rb'"max(?:_completion)?_tokens"\s*:\s*(\d+)')
MODEL = re.compile(rb'"model"\s*:\s*"([^"]*)"')
PROMPT_EMBEDS = b'"prompt_embeds"'
DEFAULT_TOKENS = 8
MAX_HEADER_BYTES = 64 * 1024


class Stats:
    requests = 0
    soft_prompt_requests = 0


def _response(status: str, body: bytes, content_type: bytes = b"application/json") -> bytes:
    return (
        b"HTTP/1.1 " + status.encode() + b"\r\ncontent-type: " + content_type
        + b"\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )


def _chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


STREAM_HEADERS = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


def answer(body: bytes) -> tuple[bytes, bool]:
    """(the HTTP response bytes, streamed?) for one chat request body."""
    parts, streamed = answer_parts(body)
    return b"".join(parts), streamed


def answer_parts(body: bytes) -> tuple[list[bytes], bool]:
    """The response as the pieces a paced server writes one at a time, and whether it is a stream."""
    found = MAX_TOKENS.search(body)
    tokens = int(found.group(1)) if found else DEFAULT_TOKENS
    model_match = MODEL.search(body)
    model = model_match.group(1).decode() if model_match else "instant"
    created = int(time.time())
    usage = {"prompt_tokens": 16, "completion_tokens": tokens, "total_tokens": 16 + tokens}
    if not STREAM.search(body):
        text = " tok" * tokens
        payload = orjson.dumps({
            "id": "chatcmpl-instant", "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": "length"}],
            "usage": usage,
        })
        return [_response("200 OK", payload)], False
    head = {"id": "chatcmpl-instant", "object": "chat.completion.chunk", "created": created, "model": model}
    events = [orjson.dumps({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                   "logprobs": None, "finish_reason": None}]})]
    token = orjson.dumps({**head, "choices": [{"index": 0, "delta": {"content": " tok"}, "logprobs": None,
                                                "finish_reason": None}]})
    events.extend([token] * max(tokens - 1, 0))
    events.append(orjson.dumps({**head, "choices": [{"index": 0, "delta": {"content": " tok"}, "logprobs": None,
                                                      "finish_reason": "length"}]}))
    if USAGE.search(body):
        events.append(orjson.dumps({**head, "choices": [], "usage": usage}))
    chunks = [_chunk(b"data: " + event + b"\n\n") for event in events]
    return [STREAM_HEADERS, *chunks, _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"], True


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pace_s: float = 0.0) -> None:
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            except asyncio.LimitOverrunError:
                writer.write(_response("431 Request Header Fields Too Large", b"{}"))
                return
            request_line, _, header_block = head.partition(b"\r\n")
            method, path, _ = request_line.split(b" ", 2)
            length = 0
            for line in header_block.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
            body = await reader.readexactly(length) if length else b""
            if method == b"POST" and path.startswith(b"/v1/chat/completions"):
                Stats.requests += 1
                Stats.soft_prompt_requests += PROMPT_EMBEDS in body
                parts, streamed = answer_parts(body)
                if streamed and pace_s > 0:
                    for part in parts:
                        writer.write(part)
                        await writer.drain()
                        await asyncio.sleep(pace_s)
                    continue
                response = b"".join(parts)
            elif path == b"/health":
                response = _response("200 OK", b"")
            elif path == b"/v1/models":
                response = _response("200 OK", orjson.dumps({"object": "list", "data": [
                    {"id": "instant", "object": "model", "created": 0, "owned_by": "bench"}]}))
            elif path == b"/stats":
                response = _response("200 OK", orjson.dumps({"requests": Stats.requests,
                                                             "soft_prompt_requests": Stats.soft_prompt_requests}))
            else:
                response = _response("404 Not Found", b'{"error":"not found"}')
            writer.write(response)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        return
    finally:
        writer.close()


async def serve(host: str, port: int, pace_ms: float = 0.0) -> None:
    async def paced(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await handle(reader, writer, pace_ms / 1000)

    server = await asyncio.start_server(paced, host, port, limit=MAX_HEADER_BYTES, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--pace-ms", type=float, default=0.0, help="pause after each stream event (0: all at once)")
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.host, args.port, args.pace_ms))
    else:
        uvloop.run(serve(args.host, args.port, args.pace_ms))


if __name__ == "__main__":
    main()
