"""The offline OpenAI-compatible chat client: the trainer's labels and the evaluation's answers.

`ChatClient` sends `/v1/chat/completions` bodies (whole, or streamed and hung up on early), any
other JSON POST under /v1 (`post_json`: a judge model's `/v1/completions`), and reads `/v1/models`
on a vLLM server or the gateway. It retries what is worth retrying
(connection errors and 429/502/503/504 before any answer text arrived) with backoff, and turns
every other failure into a `ChatRequestError` that quotes the server. Thread-safe (one
`httpx.Client`); a test hands in an `httpx.MockTransport`.

`read_sse_events` is the one reader of OpenAI's server-sent events here: it yields each event's
JSON, stops at `data: [DONE]`, and raises `StreamError` on an error event (the gateway's and
vLLM's way to fail a stream that has started) and on a stream that ends without `[DONE]` (cut
short: its text would be a truncated answer). The gateway's own relay passes events through
unparsed and is not built on this module.
Knows nothing about variants, judges, sets or labels.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from safeprompt.urls import normalise_base_url

RETRY_STATUSES = frozenset({429, 502, 503, 504})
# Shorter than the 5 s idle timeout of uvicorn and vLLM: a reused connection that the server is
# closing at the same moment fails the request (seen on this stack).
KEEPALIVE_EXPIRY_S = 4.0
DONE = "[DONE]"

__all__ = ["ChatClient", "ChatRequestError", "Completion", "StreamError", "normalise_base_url", "read_sse_events"]


class ChatRequestError(RuntimeError):
    """A request failed for good (after retries, or with a status not worth retrying)."""


class StreamError(ChatRequestError):
    """A started stream failed: an error event, a malformed event, or no `[DONE]` at its end."""


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str | None  # "judged" when the caller hung up early
    completion_tokens: int | None


def read_sse_events(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    """Each `data:` event's JSON object, up to `data: [DONE]`.

    Raises StreamError on an error event (`{"error": ...}`, or vLLM's older `{"object": "error"}`),
    on a payload that is not a JSON object, and when the lines end before `[DONE]`. Other SSE
    fields (`event:`, `id:`, comments) and blank lines are skipped. Stopping the iteration early
    is the caller's right and no error.
    """
    for line in lines:
        if not line.startswith("data:"):
            continue
        payload = line[len("data:") :].strip()
        if payload == DONE:
            return
        try:
            event = json.loads(payload)
        except ValueError:
            raise StreamError(f"stream event is not JSON: {payload[:200]!r}") from None
        if not isinstance(event, dict):
            raise StreamError(f"stream event is not a JSON object: {payload[:200]!r}")
        if "error" in event or event.get("object") == "error":
            error = event.get("error", event)
            message = error.get("message", error) if isinstance(error, dict) else error
            raise StreamError(f"stream error event: {str(message)[:300]}")
        yield event
    raise StreamError(f"stream ended without data: {DONE} (cut short; the answer would be truncated)")


class _Retryable(Exception):
    """A failure before any answer text that may be retried."""


class ChatClient:
    def __init__(
        self,
        base_url: str,
        *,
        api_key: str = "EMPTY",
        timeout_s: float = 600.0,
        retries: int = 3,
        backoff_s: float = 1.0,
        max_connections: int = 16,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = normalise_base_url(base_url)
        self._retries = retries
        self._backoff_s = backoff_s
        self._http = httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=httpx.Timeout(timeout_s, connect=10.0),
            limits=httpx.Limits(max_connections=max_connections, keepalive_expiry=KEEPALIVE_EXPIRY_S),
            transport=transport,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ChatClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _with_retries(self, what: str, attempt_once: Callable[[], Any]) -> Any:
        last_problem = ""
        for attempt in range(self._retries + 1):
            if attempt:
                time.sleep(self._backoff_s * 2 ** (attempt - 1))
            try:
                return attempt_once()
            except _Retryable as exc:
                last_problem = str(exc)
        raise ChatRequestError(f"{what} failed after {self._retries + 1} attempts: {last_problem}")

    def _check_status(self, what: str, response: httpx.Response) -> None:
        if response.status_code in RETRY_STATUSES:
            raise _Retryable(f"HTTP {response.status_code}: {_error_message(response)}")
        if response.status_code != 200:
            raise ChatRequestError(f"{what} -> HTTP {response.status_code}: {_error_message(response)}")

    def _request_json(self, method: str, path: str, body: dict | None = None) -> dict:
        what = f"{method} {self.base_url}{path}"

        def once() -> dict:
            try:
                response = self._http.request(method, path, json=body)
            except httpx.TransportError as exc:
                raise _Retryable(f"{type(exc).__name__}: {exc}") from None
            self._check_status(what, response)
            try:
                return response.json()
            except ValueError:
                raise ChatRequestError(f"{what}: response is not JSON") from None

        return self._with_retries(what, once)

    def list_models(self) -> list[str]:
        data = self._request_json("GET", "/models")
        try:
            return [entry["id"] for entry in data["data"]]
        except (KeyError, TypeError):
            raise ChatRequestError(f"GET {self.base_url}/models: unexpected answer {str(data)[:200]}") from None

    def post_json(self, path: str, body: dict) -> dict:
        """POST `body` to `path` under /v1 (e.g. "/completions") with the same retries; the JSON answer."""
        return self._request_json("POST", path, body)

    def complete(self, body: dict) -> Completion:
        """One whole (non-streamed) answer: the first choice."""
        data = self._request_json("POST", "/chat/completions", body)
        try:
            choice = data["choices"][0]
            text = choice["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise ChatRequestError(
                f"POST {self.base_url}/chat/completions: unexpected answer {str(data)[:200]}"
            ) from None
        usage = data.get("usage") or {}
        return Completion(text, choice.get("finish_reason"), usage.get("completion_tokens"))

    def stream_until(self, body: dict, done: Callable[[str], bool]) -> Completion:
        """Stream an answer and hang up as soon as `done(text so far)` holds.

        Hanging up closes the connection; the gateway (and vLLM) then abort the generation, so
        tokens that cannot change a verdict are never computed. finish_reason is "judged" then.
        Failures before any answer text are retried like `complete`; after it, a cut connection,
        an error event or a missing `[DONE]` raise (StreamError for the last two).
        """
        what = f"POST {self.base_url}/chat/completions (stream)"
        return self._with_retries(what, lambda: self._stream_once(what, body | {"stream": True}, done))

    def _stream_once(self, what: str, body: dict, done: Callable[[str], bool]) -> Completion:
        parts: list[str] = []
        finish_reason: str | None = None
        completion_tokens: int | None = None
        try:
            with self._http.stream("POST", "/chat/completions", json=body) as response:
                if response.status_code != 200:
                    response.read()
                    self._check_status(what, response)
                for event in read_sse_events(response.iter_lines()):
                    for choice in event.get("choices") or []:
                        parts.append((choice.get("delta") or {}).get("content") or "")
                        finish_reason = choice.get("finish_reason") or finish_reason
                    usage = event.get("usage") or {}
                    completion_tokens = usage.get("completion_tokens", completion_tokens)
                    if done("".join(parts)):
                        finish_reason = "judged"
                        break
        except httpx.TransportError as exc:
            if parts:
                raise StreamError(f"{what}: stream cut after {len(parts)} events: {exc}") from None
            raise _Retryable(f"{type(exc).__name__}: {exc}") from None
        return Completion("".join(parts), finish_reason, completion_tokens)


def _error_message(response: httpx.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        return response.text[:300]
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        return str(data["error"].get("message", data["error"]))[:300]
    return str(data)[:300]
