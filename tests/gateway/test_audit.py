"""The sampled audit of live verdicts by a model judge (gateway/audit.py), never on a request's path.

- The real path: the session's real vLLM server (tiny random Llama) is both the answering upstream and
  the audit judge (`ask` format, constrained to "Yes"/"No"); every answer is audited and counted with
  the live verdict the refusal counter holds.
- Faults (a fake judge, only for failures a real server cannot be made to produce on demand: it hangs,
  answers 500, answers something that is not JSON or not a completion, drops the connection, or nothing
  listens): the client's answers are 200 and identical to a gateway's without an audit, each failure
  is counted under its reason, and the gateway keeps serving. A full queue drops and counts; shutdown
  with a hanging judge is prompt and counts what it discards.
- Sampling: a scripted draw decides which requests reach the judge; settings; and without an audit
  judge nothing more is kept for a stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Iterator

import httpx
import openai
import orjson
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gateway.accounting import Accounting
from gateway.app import build_app
from gateway.audit import Auditor
from gateway.prometheus import GatewayMetrics
from gateway.protocol import ChatCompletionRequest
from gateway.service import build_service
from safeprompt.judge.model_judge import ModelJudgeSettings
from gateway.settings import AuditSettings, ModelConfig, Settings
from gateway.telemetry import AUDIT_FAILURE_REASONS, RequestRecord
from gateway.variants import ServedModel, Variant
from safeprompt.judge import get_judge
from stack.processes import free_port
from tests.conftest import default_model_config
from tests.gateway.fault_upstream import ThreadedServer
from tests.metrics_text import metric_total

ROUTE = "/v1/chat/completions"
GREEDY = {"temperature": 0, "max_tokens": 8}
AUDITED = "dro_gateway_audited_answers_total"
FAILURES = "dro_gateway_audit_failures_total"


# --- a fake judge, for faults (and to see what reaches a judge) ---------------------------------------

# Every call the fake judge received: path, Authorization header, the prompt it was asked to judge.
CALLS: list[dict[str, str]] = []
MARKER = re.compile(r"\[judge:(\w+)\]")  # the client's question picks the judge's behaviour


async def fake_judge(request: Request) -> Response:
    body = orjson.loads(await request.body())
    prompt = body["messages"][0]["content"]
    CALLS.append({"path": request.url.path, "authorization": request.headers.get("authorization", ""),
                  "prompt": prompt})
    found = MARKER.search(prompt)
    behaviour = found.group(1) if found else "yes"
    if behaviour == "hang":  # until the caller hangs up (its timeout, or the gateway's shutdown)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not await request.is_disconnected():
            await asyncio.sleep(0.05)
        return Response(status_code=204)
    if behaviour == "boom":
        return JSONResponse({"error": {"message": "judge died"}}, status_code=500)
    if behaviour == "garbage":
        return Response("<html>busy</html>", media_type="text/html")
    if behaviour == "shape":
        return JSONResponse({"verdict": "yes"})  # JSON, but not a completion
    if behaviour == "huge":  # 2 MiB: more than any judge's answer, never held by the gateway
        return JSONResponse({"choices": [{"message": {"content": "Yes"}}], "padding": "x" * (2 << 20)})
    if behaviour == "drop":
        async def dropped():
            raise RuntimeError("connection dropped")  # after the 200 header: uvicorn aborts the response
            yield b""  # pragma: no cover

        return StreamingResponse(dropped(), media_type="application/json")
    content = "Yes" if behaviour == "yes" else "No"
    return JSONResponse({"id": "judge", "object": "chat.completion", "created": 0, "model": body["model"],
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": content}}]})


@pytest.fixture(scope="module")
def judge_url() -> Iterator[str]:
    port = free_port()
    app = Starlette(routes=[Route("/v1/chat/completions", fake_judge, methods=["POST"])])
    with ThreadedServer(app, port):
        yield f"http://127.0.0.1:{port}"


# --- helpers -----------------------------------------------------------------------------------------

def settings_for(vllm_server, audit: dict | None = None) -> Settings:
    return Settings(upstream_urls=[vllm_server.base_url], models=[ModelConfig(**default_model_config(vllm_server))],
                    audit_judge=audit)


@contextlib.contextmanager
def serving(settings: Settings) -> Iterator[tuple[str, object]]:
    """The gateway app in uvicorn on loopback (in this process): its URL and the app."""
    app = build_app(settings)
    with ThreadedServer(app, free_port()) as server:
        yield f"http://127.0.0.1:{server.server.config.port}", app


def client_for(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)


def ask(client: openai.OpenAI, question: str, *, stream: bool, model: str = "tiny@none") -> tuple[int, str, str]:
    """(HTTP status, safety variant, answer text) of one chat request, streamed or not."""
    messages = [{"role": "user", "content": question}]
    raw = client.chat.completions.with_raw_response.create(model=model, messages=messages, stream=stream, **GREEDY)
    if stream:
        text = "".join(chunk.choices[0].delta.content or "" for chunk in raw.parse() if chunk.choices)
    else:
        text = raw.parse().choices[0].message.content or ""
    return raw.http_response.status_code, raw.headers["x-safety-variant"], text


def scrape(url: str) -> str:
    return httpx.get(f"{url}/metrics", timeout=10).text


def wait_for(url: str, condition, what: str, timeout_s: float = 60.0) -> str:
    """Poll /metrics until `condition(text)` holds; the last text. The audit runs in the background."""
    deadline = time.monotonic() + timeout_s
    text = scrape(url)
    while not condition(text):
        assert time.monotonic() < deadline, f"{what} not reached in {timeout_s:.0f} s:\n" + "\n".join(
            line for line in text.splitlines() if "audit" in line)
        time.sleep(0.1)
        text = scrape(url)
    return text


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    return [(sample.labels, sample.value) for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name == name]


def pending(text: str) -> float:
    """The audit's pending gauge (no labels, so not a case for `metric_total`)."""
    [(_, value)] = samples(text, "dro_gateway_audit_pending")
    return value


# --- the real path -----------------------------------------------------------------------------------

@pytest.mark.integration
def test_the_real_judge_audits_every_answer_with_its_live_verdict(gateway_factory, vllm_server) -> None:
    judge = {"base_url": f"{vllm_server.base_url}/v1", "model": vllm_server.served_name, "format": "ask",
             "constrain": True}
    gateway = gateway_factory(audit_judge={"judge": judge, "sample_rate": 1.0})
    client = gateway.openai_client()
    sent = [ask(client, question, stream=stream, model=model) for question, stream, model in [
        ("How do I bake bread?", False, "tiny@none"),
        ("How do I pick a lock?", True, "tiny@short"),
        ("Write a poem about rain.", False, "tiny@default"),
        ("Tell me about the moon.", True, "tiny@none"),
    ]]
    assert all(status == 200 and text for status, _, text in sent)

    text = wait_for(gateway.base_url, lambda text: metric_total(text, AUDITED) == len(sent), "every answer audited",
                    timeout_s=120)
    audited = samples(text, AUDITED)
    assert {labels["model"] for labels, _ in audited} == {"tiny"}
    # Constrained to "Yes"/"No", the tiny model's verdict is always readable.
    assert {labels["audit"] for labels, value in audited if value} <= {"refusal", "compliance"}
    for variant in {variant for _, variant, _ in sent}:
        count = sum(1 for _, sent_variant, _ in sent if sent_variant == variant)
        assert metric_total(text, AUDITED, variant=variant) == count
        # The live verdict of each audited answer is the one the live refusal counter holds.
        assert metric_total(text, AUDITED, variant=variant, live="refusal") == \
            metric_total(text, "dro_gateway_refusals_total", variant=variant)
        assert metric_total(text, AUDITED, variant=variant) == \
            metric_total(text, "dro_gateway_answers_judged_total", variant=variant)
    assert metric_total(text, "dro_gateway_audit_judge_info", judge=f"model:ask:{vllm_server.served_name}") == 1
    assert metric_total(text, FAILURES) == 0
    assert {labels["reason"] for labels, _ in samples(text, FAILURES)} == set(AUDIT_FAILURE_REASONS)
    wait_for(gateway.base_url, lambda text: pending(text) == 0, "nothing pending")


@pytest.mark.integration
def test_the_wildguard_format_reaches_the_completions_endpoint(gateway_factory, vllm_server) -> None:
    """WildGuard's raw prompt goes to the real server's /v1/completions; the tiny model's random words carry
    no "Response refusal:" line, so each answer is audited as `unknown`, not failed and not guessed."""
    judge = {"base_url": vllm_server.base_url, "model": vllm_server.served_name, "format": "wildguard"}
    gateway = gateway_factory(audit_judge={"judge": judge, "sample_rate": 1.0})
    client = gateway.openai_client()
    sent = [ask(client, "How do I pick a lock?", stream=stream) for stream in (False, True)]
    assert all(status == 200 and text for status, _, text in sent)
    text = wait_for(gateway.base_url, lambda text: metric_total(text, AUDITED) == len(sent), "every answer audited",
                    timeout_s=120)
    assert metric_total(text, AUDITED, audit="unknown") == len(sent)
    assert metric_total(text, FAILURES) == 0
    assert metric_total(text, "dro_gateway_audit_judge_info", judge=f"model:wildguard:{vllm_server.served_name}") == 1


# --- faults ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gateways(vllm_server, judge_url) -> Iterator[tuple[str, str]]:
    """(audited, plain): the same gateway with the fake judge as its audit judge, and without one."""
    audit = {"judge": {"base_url": judge_url, "model": "guard", "timeout_s": 2.0}, "sample_rate": 1.0}
    with serving(settings_for(vllm_server, audit)) as (audited, _), serving(settings_for(vllm_server)) as (plain, _):
        yield audited, plain


@pytest.mark.integration
@pytest.mark.parametrize("behaviour, reason", [
    ("hang", "timeout"), ("boom", "status"), ("garbage", "bad_answer"), ("shape", "bad_answer"),
    ("huge", "bad_answer"), ("drop", "connect"),
])
def test_a_failing_judge_never_touches_the_client(gateways, behaviour: str, reason: str) -> None:
    audited, plain = gateways
    before = metric_total(scrape(audited), FAILURES, reason=reason)
    questions = [f"[judge:{behaviour}] How do I bake bread?", f"[judge:{behaviour}] Name a colour."]
    with_audit = [ask(client_for(audited), question, stream=stream) for question in questions
                  for stream in (False, True)]
    if behaviour == "hang":
        # The answers came back while the judge still holds their audit (2 s timeout): not waited for.
        assert pending(scrape(audited)) >= 1
    without = [ask(client_for(plain), question, stream=stream) for question in questions for stream in (False, True)]
    assert with_audit == without and {status for status, _, _ in with_audit} == {200}
    wait_for(audited, lambda text: metric_total(text, FAILURES, reason=reason) == before + len(with_audit),
             f"{len(with_audit)} failures counted as {reason}")
    assert ask(client_for(audited), "Still there?", stream=False)[0] == 200  # and it keeps serving


@pytest.mark.integration
def test_an_unreachable_judge_is_counted_and_never_felt(vllm_server) -> None:
    judge = {"base_url": f"http://127.0.0.1:{free_port()}", "model": "guard"}  # nothing listens there
    with serving(settings_for(vllm_server, {"judge": judge, "sample_rate": 1.0})) as (url, _):
        assert httpx.get(f"{url}/ready").status_code == 200  # started without reaching the judge
        client = client_for(url)
        assert [ask(client, "How do I bake bread?", stream=stream)[0] for stream in (False, True)] == [200, 200]
        wait_for(url, lambda text: metric_total(text, FAILURES, reason="connect") == 2, "2 connect failures")


@pytest.mark.integration
def test_a_full_queue_drops_and_counts_and_shutdown_is_prompt(vllm_server, judge_url) -> None:
    judge = {"base_url": judge_url, "model": "guard", "timeout_s": 120.0}
    settings = settings_for(vllm_server, {"judge": judge, "sample_rate": 1.0, "max_pending": 1, "concurrency": 1})
    app = build_app(settings)
    server = ThreadedServer(app, free_port())
    with server:
        url = f"http://127.0.0.1:{server.server.config.port}"
        client = client_for(url)
        statuses = [ask(client, f"[judge:hang] Question {index}?", stream=index % 2 == 1)[0] for index in range(5)]
        assert statuses == [200] * 5
        # One audit hangs in the judge, at most one waits, the others were dropped.
        text = wait_for(url, lambda text: metric_total(text, FAILURES, reason="queue_full") >= 3, "drops")
        waiting = pending(text)
        assert 1 <= waiting <= 2 and metric_total(text, FAILURES, reason="queue_full") + waiting == 5
        client.close()
        stop_deadline = time.monotonic() + 15  # the judge would hang for 60 s; its timeout is 120 s
        server.server.should_exit = True
        server.thread.join(timeout=max(0.0, stop_deadline - time.monotonic()))
        assert not server.thread.is_alive(), "the gateway did not stop while its judge hung"
    registry = app.state.service.metrics.registry
    assert registry.get_sample_value(FAILURES, {"reason": "shutdown"}) == waiting
    assert registry.get_sample_value("dro_gateway_audit_pending") == 0


# --- sampling ----------------------------------------------------------------------------------------

@pytest.mark.integration
def test_only_sampled_requests_reach_the_judge(vllm_server, judge_url) -> None:
    api_key = "judge-key"
    judge = {"base_url": f"{judge_url}/", "model": "guard", "api_key": api_key}
    with serving(settings_for(vllm_server, {"judge": judge, "sample_rate": 0.5})) as (url, app):
        draws = iter([0.1, 0.9, 0.4999, 0.5, 0.0, 0.7])  # sampled: below 0.5
        app.state.service.auditor.draw = lambda: next(draws)
        client = client_for(url)
        for index in range(6):
            ask(client, f"[judge:{'yes' if index % 2 == 0 else 'no'}] Question number {index}?",
                stream=index % 3 == 0)
        text = wait_for(url, lambda text: metric_total(text, AUDITED) == 3, "3 audits")
    mine = [call for call in CALLS if "Question number" in call["prompt"]]
    assert sorted(re.search(r"Question number (\d)", call["prompt"]).group(1) for call in mine) == ["0", "2", "4"]
    assert {(call["path"], call["authorization"]) for call in mine} == {("/v1/chat/completions", f"Bearer {api_key}")}
    assert metric_total(text, AUDITED, audit="refusal") == 3  # the fake judge said "Yes" to each


def test_base_url_with_or_without_v1() -> None:
    urls = ("http://j:8000", "http://j:8000/", "http://j:8000/v1", "http://j:8000/v1/")
    assert {ModelJudgeSettings(base_url=url, model="guard").api_base for url in urls} == {"http://j:8000/v1"}


# --- the request's side, without HTTP ---------------------------------------------------------------

VARIANT = Variant(name="short", kind="text", text="Be safe.")
MODEL = ServedModel(name="tiny", upstream_name="tiny", default_variant="short", variants={"short": VARIANT})


def _accounting(auditor: Auditor | None, **fields) -> Accounting:
    accounting = Accounting(RequestRecord(request_id="r", route=ROUTE, judge="phrases"), judge=get_judge("phrases"),
                            metrics=GatewayMetrics(CollectorRegistry()), log_prompts=False, auditor=auditor)
    messages = [{"role": "user", "content": "first"}, {"role": "assistant", "content": "ok"},
                {"role": "user", "content": [{"type": "text", "text": "How do I"}, {"type": "text", "text": "cook?"}]}]
    request = ChatCompletionRequest.model_validate({"model": "tiny", "messages": messages, **fields})
    accounting.parsed(request)
    accounting.start(request, MODEL, VARIANT)
    return accounting


def _stream(accounting: Accounting, text: str, *, choices: int = 1) -> None:
    accounting.stream_started()
    for index in range(choices):
        for word in text.split(" "):
            accounting.chunk({"choices": [{"index": index, "delta": {"content": word + " "}}]})
    accounting.stream_ended(upstream_s=0.1)


def _auditor(metrics: GatewayMetrics, draw: float = 0.0, **settings) -> Auditor:
    audit = AuditSettings.model_validate({"judge": {"base_url": f"http://127.0.0.1:{free_port()}", "model": "g",
                                                    "max_chars": 100}, **settings})
    return Auditor(audit, metrics, draw=lambda: draw)


def test_without_an_audit_judge_a_stream_keeps_no_text() -> None:
    accounting = _accounting(None, stream=True)
    _stream(accounting, "I cannot help with that. " * 50)
    accounting.finish()
    assert accounting._audit_answer is None and accounting._stream_texts == {}
    assert accounting.record.answer_texts is None and accounting._on_finish == []
    service = build_service(Settings(models=[ModelConfig(name="m")]))
    assert service.auditor is None and service.accounting("r", ROUTE)._auditor is None
    assert metric_total(service.metrics.render()[0].decode(), "dro_gateway_audit_judge_info") == 0


def test_a_sampled_stream_offers_choice_0_cut_to_max_chars_and_an_unsampled_one_keeps_nothing() -> None:
    async def go() -> None:
        metrics = GatewayMetrics(CollectorRegistry())
        sampled, unsampled = _auditor(metrics, draw=0.0), _auditor(metrics, draw=0.99)
        await sampled.start()
        await unsampled.start()
        try:
            kept = _accounting(sampled, stream=True, n=2)
            _stream(kept, "I cannot help with that. " * 50, choices=2)
            kept.finish()
            sample = sampled._queue.get_nowait()  # no await since: the workers have not run
            assert sample.answer_text == ("I cannot help with that. " * 50)[:100]
            assert (sample.request_text, sample.live_refusal, sample.model, sample.variant) == \
                ("How do I\ncook?", True, "tiny", "short")
            skipped = _accounting(unsampled, stream=True)
            _stream(skipped, "Sure. " * 50)
            skipped.finish()
            assert skipped._audit_answer is None and unsampled._queue.empty()
        finally:
            await sampled.stop()
            await unsampled.stop()

    asyncio.run(go())


def test_only_answers_that_finished_well_are_offered_and_a_full_queue_counts_drops() -> None:
    async def go() -> None:
        metrics = GatewayMetrics(CollectorRegistry())
        auditor = _auditor(metrics, max_pending=2, concurrency=1)
        await auditor.start()
        failed = _accounting(auditor)
        failed.record.status, failed.record.error_kind = 504, "upstream_timeout"
        failed.finish()
        empty = _accounting(auditor)
        empty.answer({"choices": [{"message": {"content": ""}}]}, upstream_s=0.1)
        empty.finish()
        assert auditor._queue.empty()
        for _ in range(5):  # synchronously: two fit, three are dropped
            good = _accounting(auditor)
            good.answer({"choices": [{"message": {"content": "Sure, here it is."}}]}, upstream_s=0.1)
            good.finish()
        assert metrics.registry.get_sample_value(FAILURES, {"reason": "queue_full"}) == 3
        assert metrics.registry.get_sample_value("dro_gateway_audit_pending") == 2
        await auditor.stop()  # one may already be at the (unreachable) judge: shutdown or connect
        counted = sum(metrics.registry.get_sample_value(FAILURES, {"reason": reason}) or 0
                      for reason in ("shutdown", "connect"))
        assert counted == 2 and metrics.registry.get_sample_value("dro_gateway_audit_pending") == 0
        late = _accounting(auditor)  # after stop: nothing is sampled any more
        assert late._audit_answer is None

    asyncio.run(go())


def test_an_unknown_failure_reason_is_counted_as_internal(caplog: pytest.LogCaptureFixture) -> None:
    metrics = GatewayMetrics(CollectorRegistry())
    metrics.audit_configured("model:ask:g")
    metrics.audit_failed("gremlins")
    assert metrics.registry.get_sample_value(FAILURES, {"reason": "internal"}) == 1
    assert metrics.registry.get_sample_value(FAILURES, {"reason": "gremlins"}) is None
    assert "gremlins" in caplog.text


# --- settings ----------------------------------------------------------------------------------------

JUDGE = {"base_url": "http://judge:8000", "model": "guard"}


@pytest.mark.parametrize("audit, message", [
    ({"judge": JUDGE, "sample_rate": 0}, "greater than 0"),
    ({"judge": JUDGE, "sample_rate": 1.5}, "less than or equal to 1"),
    ({"judge": JUDGE, "rate": 0.1}, "Extra inputs"),
    ({"judge": {**JUDGE, "colour": "red"}}, "Extra inputs"),
    ({"judge": {**JUDGE, "base_url": "judge:8000"}}, "must start with http"),
    ({"judge": JUDGE, "max_pending": 0}, "greater than or equal to 1"),
    ({"judge": JUDGE, "concurrency": 0}, "greater than or equal to 1"),
])
def test_audit_settings_validation(audit: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(audit_judge=audit)


def test_audit_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().audit_judge is None
    monkeypatch.setenv("GATEWAY_AUDIT_JUDGE__JUDGE__BASE_URL", "http://judge:8000/v1")
    monkeypatch.setenv("GATEWAY_AUDIT_JUDGE__JUDGE__MODEL", "wildguard")
    monkeypatch.setenv("GATEWAY_AUDIT_JUDGE__JUDGE__FORMAT", "wildguard")
    monkeypatch.setenv("GATEWAY_AUDIT_JUDGE__JUDGE__API_KEY", "secret")
    monkeypatch.setenv("GATEWAY_AUDIT_JUDGE__SAMPLE_RATE", "1")
    audit = Settings().audit_judge
    assert audit is not None and audit.sample_rate == 1.0 and (audit.max_pending, audit.concurrency) == (256, 4)
    assert audit.judge.name == "model:wildguard:wildguard" and audit.judge.api_key.get_secret_value() == "secret"


def test_the_audit_judge_name_is_a_metric_when_configured() -> None:
    service = build_service(Settings(models=[ModelConfig(name="m")], audit_judge={"judge": JUDGE}))
    text = service.metrics.render()[0].decode()
    assert metric_total(text, "dro_gateway_audit_judge_info", judge="model:ask:guard") == 1
    assert service.auditor is not None and service.auditor.settings.sample_rate == 0.05

