"""A scripted fake vLLM over real HTTP on loopback: an HTTP/1.1 server on raw asyncio (127.0.0.1, an
ephemeral port, its own event loop in a background thread) that answers each request as a test's
handler says: a JSON answer, an SSE stream written part by part (slowly, or waiting for the test
between parts), a 4xx or 5xx, a stream that drops its connection or goes silent mid-body, no answer
at all until the client leaves, or a connection closed before any answer. It can also stop
listening, so that new connections are refused.

It keeps every request it received (`requests`) and counts the requests whose client hung up before
their answer was over (`hang_ups`): how a test sees that the gateway closed vLLM's request. It reads
only what the gateway sends (a request line, headers and a Content-Length body), on keep-alive
connections. For the gateway's own tests: a real vLLM cannot be made to fail on demand.
"""

from __future__ import annotations

import asyncio
import http
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson


@dataclass(frozen=True)
class Received:
    method: str
    path: str
    headers: dict[str, str]  # names in lower case
    body: bytes
    connection: int  # the connection it came on, numbered from 0 in the order they were accepted

    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass(frozen=True)
class Reply:
    """One answer. `first`: "answer"; "hang": nothing until the client leaves; "close": the connection
    is closed before any byte. The body is `json`, or the raw `body` (both with Content-Length), or,
    when `parts` is given, those parts in chunked encoding, one write each, `part_delay_s` before each;
    a `threading.Event` among the parts holds the rest back until the test sets it. After the parts
    the body `then` ends, or the connection is dropped mid-body ("drop"), or nothing more is sent
    until the client leaves ("stall")."""

    status: int = 200
    json: Any = None
    body: bytes = b""
    parts: Sequence[bytes | threading.Event] | None = None
    then: Literal["end", "drop", "stall"] = "end"
    first: Literal["answer", "hang", "close"] = "answer"
    part_delay_s: float = 0.0
    headers: Mapping[str, str] = field(default_factory=dict)


Handler = Callable[[Received], Reply]
GATE_TIMEOUT_S = 30.0  # a test that never sets its gate fails instead of hanging


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _head(status: int, headers: Mapping[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class ScriptedUpstream:
    """`with ScriptedUpstream(handler) as server:` serves on `server.url` until the block ends."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[Received] = []
        self.errors: list[BaseException] = []  # the script's own failures, raised at the end
        self._hang_ups = 0
        self._changed = threading.Condition()
        self._connections = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="scripted-upstream", daemon=True)
        self._server: asyncio.Server | None = None
        self.url = ""

    # --- what the test sees ----------------------------------------------------------------------
    @property
    def hang_ups(self) -> int:
        with self._changed:
            return self._hang_ups

    def wait_for_hang_ups(self, count: int, timeout_s: float = 10.0) -> bool:
        """True once `count` requests were left by their client before their answer was over."""
        with self._changed:
            return self._changed.wait_for(lambda: self._hang_ups >= count, timeout_s)

    def chat_requests(self) -> list[Received]:
        return [request for request in self.requests if request.path != "/health"]

    # --- life --------------------------------------------------------------------------------------
    def __enter__(self) -> ScriptedUpstream:
        self._thread.start()
        self._server = self._call(asyncio.start_server(self._serve, "127.0.0.1", 0))
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def stop_listening(self) -> None:
        """New connections are refused from now on; those already open are served as before."""
        self._call(self._stop_listening())

    def __exit__(self, *exc_info: object) -> None:
        self._call(self._shut_down())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
        if self.errors and exc_info[0] is None:
            raise AssertionError(f"the scripted upstream failed: {self.errors[0]!r}") from self.errors[0]

    def _call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=30)

    async def _stop_listening(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _shut_down(self) -> None:
        await self._stop_listening()
        for writer in list(self._writers):
            writer.close()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        for task in self._tasks:
            task.cancel()

    # --- serving -----------------------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        connection = self._connections
        self._connections += 1
        try:
            while await self._exchange(reader, writer, connection):
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception as exc:  # e.g. a gate never opened: fail the test at the end
            self.errors.append(exc)
        finally:
            self._writers.discard(writer)
            self._tasks.discard(task)
            writer.close()

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, connection: int) -> bool:
        """Read one request and answer it; False when the connection is to end."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False  # the client closed an idle connection
        request_line, *header_lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
        method, path, _ = request_line.split(" ", 2)
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        assert "chunked" not in headers.get("transfer-encoding", ""), "the fake reads Content-Length bodies only"
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        request = Received(method=method, path=path, headers=headers, body=body, connection=connection)
        self.requests.append(request)
        try:
            reply = self.handler(request)
        except Exception as exc:  # a bug in the test's script: answer 500, fail the test at the end
            self.errors.append(exc)
            reply = Reply(status=500, json={"error": {"message": f"scripted upstream failed: {exc!r}"}})
        return await self._answer(reply, reader, writer)

    async def _answer(self, reply: Reply, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        if reply.first == "close":
            return False
        if reply.first == "hang":
            await self._until_client_leaves(reader)
            return False
        if reply.parts is None:
            body = orjson.dumps(reply.json) if reply.json is not None else reply.body
            content_type = "application/json" if reply.json is not None else "text/plain"
            headers = {"content-type": content_type, **reply.headers, "content-length": str(len(body))}
            writer.write(_head(reply.status, headers) + body)
            await writer.drain()
            return True
        headers = {"content-type": "text/event-stream", **reply.headers, "transfer-encoding": "chunked"}
        writer.write(_head(reply.status, headers))
        try:
            for part in reply.parts:
                if isinstance(part, threading.Event):
                    if not await asyncio.to_thread(part.wait, GATE_TIMEOUT_S):
                        raise AssertionError("the test never opened the gate of its scripted stream")
                    continue
                if reply.part_delay_s:
                    await asyncio.sleep(reply.part_delay_s)
                writer.write(_chunk(part))
                await writer.drain()
        except ConnectionError:
            self._hung_up()
            return False
        if reply.then == "drop":
            await writer.drain()
            return False  # closed without the last chunk: the body is cut
        if reply.then == "stall":
            await self._until_client_leaves(reader)
            return False
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True

    async def _until_client_leaves(self, reader: asyncio.StreamReader) -> None:
        """Send nothing until the client closes the connection (it sends nothing more meanwhile)."""
        try:
            await reader.read(1)
        except ConnectionError:
            pass
        self._hung_up()

    def _hung_up(self) -> None:
        with self._changed:
            self._hang_ups += 1
            self._changed.notify_all()
