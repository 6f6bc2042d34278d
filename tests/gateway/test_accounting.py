"""Per-request accounting (gateway/accounting.py): verdicts per choice, usage, errors, once only."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from gateway.accounting import Accounting
from gateway.errors import UpstreamDisconnected, UpstreamTimeout
from gateway.prometheus import GatewayMetrics
from gateway.protocol import ChatCompletionRequest
from gateway.telemetry import RequestRecord
from gateway.variants import ServedModel, Variant
from safeprompt.judge import get_judge

ROUTE = "/v1/chat/completions"
VARIANT = Variant(name="short", kind="text", text="Be safe.")
MODEL = ServedModel(name="tiny", upstream_name="tiny", default_variant="short", variants={"short": VARIANT})


def _accounting(log_prompts: bool = True, **fields) -> tuple[Accounting, GatewayMetrics]:
    metrics = GatewayMetrics(CollectorRegistry())
    accounting = Accounting(RequestRecord(request_id="r", route=ROUTE, judge="paper"), judge=get_judge("paper"),
                            metrics=metrics, log_prompts=log_prompts)
    request = ChatCompletionRequest.model_validate(
        {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **fields})
    accounting.parsed(request)
    accounting.start(request, MODEL, VARIANT)
    return accounting, metrics


def _delta(index: int, text: str) -> dict:
    return {"choices": [{"index": index, "delta": {"content": text}}]}


def test_a_stream_gets_one_verdict_per_requested_choice() -> None:
    accounting, metrics = _accounting(n=2, stream=True)
    accounting.stream_started()
    accounting.chunk(_delta(0, "I cannot "))
    accounting.chunk(_delta(0, "help."))
    accounting.chunk({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}})
    accounting.fail(UpstreamDisconnected("cut"))
    accounting.stream_ended(upstream_s=0.5)
    accounting.finish()
    record = accounting.record
    assert [verdict.refusal for verdict in record.verdicts] == [True, False]  # choice 1 sent nothing
    assert record.answer_texts == ["I cannot help.", ""]
    assert (record.status, record.error_kind) == (200, "upstream_disconnect")  # the 200 was already sent
    assert (record.prompt_tokens, record.completion_tokens, record.upstream_s) == (5, 2, 0.5)
    assert record.first_token_s is not None


def test_an_error_before_the_answer_sets_the_status_and_finish_counts_once() -> None:
    accounting, metrics = _accounting(log_prompts=False)
    accounting.fail(UpstreamTimeout("slow"))
    accounting.finish()
    accounting.finish()
    labels = {"model": "tiny", "variant": "short"}
    assert metrics.registry.get_sample_value("dro_gateway_requests_total", {**labels, "route": ROUTE,
                                                                            "status": "504"}) == 1
    assert metrics.registry.get_sample_value("dro_gateway_requests_in_flight", {**labels, "route": ROUTE}) == 0
    assert accounting.record.prompt_text is None


def test_a_whole_answer_is_judged_per_choice() -> None:
    accounting, _ = _accounting()
    accounting.answer({"choices": [{"message": {"content": "I cannot do that."}}, {"message": {"content": "Sure."}}],
                       "usage": {"prompt_tokens": 3, "completion_tokens": 9}}, upstream_s=1.0)
    assert [verdict.refusal for verdict in accounting.record.verdicts] == [True, False]
    assert accounting.record.answer_texts == ["I cannot do that.", "Sure."]
    assert accounting.record.completion_tokens == 9
