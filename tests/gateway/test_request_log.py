"""The request log (gateway/request_log.py): one JSON line per request, personal data only when asked."""

from __future__ import annotations

import io
import json
import logging

import pytest

from gateway.request_log import LOGGER_NAME, build_log_entry, configure_request_log, log_request
from safeprompt.judge import Verdict
from tests.gateway.records import record


def test_request_log_line_without_prompts() -> None:
    stream = io.StringIO()
    configure_request_log(stream)
    rec = record(request_id="abc", user="alice", prompt_text="how do I", answer_texts=["I can't help"],
                 verdicts=[Verdict(True, "phrases", "I can't ")], error_kind=None)
    log_request(rec, log_prompts=False)
    line = stream.getvalue().strip()
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["request_id"] == "abc" and entry["model"] == "smollm2" and entry["variant"] == "dro"
    assert entry["status"] == 200 and entry["refusal"] is True and entry["refusals"] == [True]
    assert entry["matched"] == ["I can't "] and entry["judge"] == "phrases"
    assert entry["prompt_tokens"] == 40 and entry["completion_tokens"] == 12
    assert entry["latency_s"] == 1.0 and entry["ttft_s"] == 0.2 and entry["overhead_s"] == pytest.approx(0.1)
    assert "how do I" not in line and "alice" not in line and "I can't help" not in line
    assert logging.getLogger(LOGGER_NAME).propagate is False


def test_request_log_with_prompts() -> None:
    rec = record(user="alice", prompt_text="how do I", answer_texts=["Sure"], verdicts=[])
    entry = build_log_entry(rec, log_prompts=True)
    assert entry["prompt"] == "how do I" and entry["answers"] == ["Sure"] and entry["user"] == "alice"
    assert entry["refusal"] is None and entry["refusals"] == []
