"""The pure chunk rewrite of the stream relay (gateway/relay.py); the relay itself runs in
test_completions.py (in-process) and test_faults.py (real HTTP)."""

from __future__ import annotations

import copy

from gateway.relay import rewrite_chunk

CHUNK = {"id": "c", "object": "chat.completion.chunk", "model": "tiny-llama",
         "choices": [{"index": 0, "delta": {"content": "hi"}}],
         "usage": {"prompt_tokens": 3, "completion_tokens": 1}}
USAGE_ONLY = {"id": "c", "object": "chat.completion.chunk", "model": "tiny-llama", "choices": [],
              "usage": {"prompt_tokens": 3, "completion_tokens": 1}}


def test_model_becomes_the_asked_id_in_place() -> None:
    out = rewrite_chunk(CHUNK, model_id="tiny@dro", include_usage=True)
    assert out == {**CHUNK, "model": "tiny@dro"}
    assert list(out) == list(CHUNK)  # same key order: the client's bytes keep vLLM's layout


def test_usage_is_removed_unless_asked() -> None:
    assert rewrite_chunk(CHUNK, model_id="m", include_usage=False) == {
        "id": "c", "object": "chat.completion.chunk", "model": "m", "choices": CHUNK["choices"]}
    assert rewrite_chunk(USAGE_ONLY, model_id="m", include_usage=False) is None
    assert rewrite_chunk(USAGE_ONLY, model_id="m", include_usage=True)["usage"] == USAGE_ONLY["usage"]


def test_error_events_pass_unchanged_and_nothing_is_mutated() -> None:
    error = {"error": {"message": "engine died", "type": "InternalServerError"}}
    assert rewrite_chunk(error, model_id="m", include_usage=False) == error
    before = copy.deepcopy(CHUNK)
    rewrite_chunk(CHUNK, model_id="m", include_usage=False)
    assert CHUNK == before
