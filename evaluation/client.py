"""The harness's HTTP client for OpenAI-compatible servers (the gateway, vLLM, a guard model).

Sends `/v1/chat/completions` bodies and reads `/v1/models`; retries what is worth retrying
(connection errors, 429, 502-504) with backoff, and turns every other failure into an
`EvalRequestError` that quotes the server's message. Thread-safe (one httpx.Client).
This module knows nothing about variants, sets or metrics.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Callable

import httpx

RETRY_STATUSES = frozenset({429, 502, 503, 504})
# Shorter than the 5 s idle timeout of uvicorn and vLLM: a reused connection that the server is
# closing at the same moment fails the request (seen on this stack).
KEEPALIVE_EXPIRY_S = 4.0


class EvalRequestError(RuntimeError):
    """A request failed for good (after retries, or with a status not worth retrying)."""


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str | None
    completion_tokens: int | None


def normalise_base_url(url: str) -> str:
    """`http://host:port`, `.../` or `.../v1` all become `http://host:port/v1`."""
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"base URL must start with http:// or https://, got {url!r}")
    return url if url.endswith("/v1") else f"{url}/v1"


class ChatClient:
    def __init__(self, base_url: str, *, api_key: str = "EMPTY", timeout_s: float = 600.0,
                 retries: int = 3, backoff_s: float = 1.0, max_connections: int = 16) -> None:
        self.base_url = normalise_base_url(base_url)
        self._retries = retries
        self._backoff_s = backoff_s
        self._http = httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=httpx.Timeout(timeout_s, connect=10.0),
            limits=httpx.Limits(max_connections=max_connections, keepalive_expiry=KEEPALIVE_EXPIRY_S),
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "ChatClient":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        last_problem = ""
        for attempt in range(self._retries + 1):
            if attempt:
                time.sleep(self._backoff_s * 2 ** (attempt - 1))
            try:
                response = self._http.request(method, path, json=body)
            except httpx.TransportError as exc:
                last_problem = f"{type(exc).__name__}: {exc}"
                continue
            if response.status_code in RETRY_STATUSES:
                last_problem = f"HTTP {response.status_code}: {_error_message(response)}"
                continue
            if response.status_code != 200:
                raise EvalRequestError(f"{method} {self.base_url}{path} -> HTTP {response.status_code}: "
                                       f"{_error_message(response)}")
            try:
                return response.json()
            except ValueError:
                raise EvalRequestError(f"{method} {self.base_url}{path}: response is not JSON") from None
        raise EvalRequestError(f"{method} {self.base_url}{path} failed after {self._retries + 1} attempts: "
                               f"{last_problem}")

    def list_models(self) -> list[str]:
        data = self._request("GET", "/models")
        try:
            return [entry["id"] for entry in data["data"]]
        except (KeyError, TypeError):
            raise EvalRequestError(f"GET {self.base_url}/models: unexpected answer {str(data)[:200]}") from None

    def complete(self, body: dict) -> Completion:
        data = self._request("POST", "/chat/completions", body)
        try:
            choice = data["choices"][0]
            text = choice["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise EvalRequestError(f"POST {self.base_url}/chat/completions: unexpected answer {str(data)[:200]}") from None
        usage = data.get("usage") or {}
        return Completion(text, choice.get("finish_reason"), usage.get("completion_tokens"))


    def stream_until(self, body: dict, done: Callable[[str], bool]) -> Completion:
        """Stream an answer and hang up as soon as `done(text so far)` holds.

        Hanging up closes the connection; the gateway (and vLLM) then abort the generation, so
        tokens that cannot change a verdict are never computed. finish_reason is "judged" then.
        Connection failures before the first byte are retried like `complete`.
        """
        last_problem = ""
        for attempt in range(self._retries + 1):
            if attempt:
                time.sleep(self._backoff_s * 2 ** (attempt - 1))
            try:
                return self._stream_once(body | {"stream": True}, done)
            except _Retryable as exc:
                last_problem = str(exc)
        raise EvalRequestError(f"POST {self.base_url}/chat/completions (stream) failed after "
                               f"{self._retries + 1} attempts: {last_problem}")

    def _stream_once(self, body: dict, done: Callable[[str], bool]) -> Completion:
        parts: list[str] = []
        finish_reason: str | None = None
        try:
            with self._http.stream("POST", "/chat/completions", json=body) as response:
                if response.status_code in RETRY_STATUSES:
                    response.read()
                    raise _Retryable(f"HTTP {response.status_code}: {_error_message(response)}")
                if response.status_code != 200:
                    response.read()
                    raise EvalRequestError(f"POST {self.base_url}/chat/completions -> HTTP "
                                           f"{response.status_code}: {_error_message(response)}")
                for line in response.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    payload = line[len("data:"):].strip()
                    if payload == "[DONE]":
                        break
                    event = json.loads(payload)
                    if "error" in event:
                        raise EvalRequestError(f"stream error: {str(event['error'])[:300]}")
                    for choice in event.get("choices") or []:
                        parts.append((choice.get("delta") or {}).get("content") or "")
                        finish_reason = choice.get("finish_reason") or finish_reason
                    if done("".join(parts)):
                        finish_reason = "judged"
                        break
        except httpx.TransportError as exc:
            if parts:
                raise EvalRequestError(f"stream cut after {len(parts)} events: {exc}") from None
            raise _Retryable(f"{type(exc).__name__}: {exc}") from None
        return Completion("".join(parts), finish_reason, None)


class _Retryable(Exception):
    """A stream that failed before any content and may be retried."""


def _error_message(response: httpx.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        return response.text[:300]
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        return str(data["error"].get("message", data["error"]))[:300]
    return str(data)[:300]
