"""Admission control (gateway/admission.py): per-key requests and tokens per minute (429 with
Retry-After, nothing sent to vLLM), and the concurrency cap with its bounded queue (503 overloaded).
The buckets run on an injected clock; the route tests go through the real app (mock vLLM)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import pytest

from gateway.admission import Admission, TokenBucket
from gateway.auth import hash_key
from gateway.errors import GatewayOverloaded, RateLimited
from tests.gateway.mock_vllm import answer, error_of, ok, post, start_gateway
from tests.gateway.scripted_upstream import Received, Reply


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_bucket_starts_full_refills_continuously_and_may_go_into_debt() -> None:
    bucket = TokenBucket(rate_per_s=1.0, capacity=3.0)
    assert bucket.wait_for(3, now=0.0) == 0
    bucket.take(5, now=0.0)  # a request larger than the balance: debt
    assert bucket.wait_for(1, now=0.0) == pytest.approx(3.0)
    assert bucket.wait_for(1, now=2.5) == pytest.approx(0.5)
    assert bucket.wait_for(1, now=100.0) == 0 and bucket.tokens == 3.0  # never above capacity


def test_requests_per_minute() -> None:
    clock = Clock()
    admission = Admission(max_concurrent=4, max_queued=0, queue_timeout_s=1, clock=clock)
    admission.limit_key("k", requests_per_minute=3, tokens_per_minute=None)
    for _ in range(3):
        admission.admit("k")
    with pytest.raises(RateLimited) as caught:
        admission.admit("k")
    assert caught.value.status_code == 429 and caught.value.headers == {"Retry-After": "20"}
    admission.admit("other")  # another key (or none) is not limited
    admission.admit(None)
    clock.now += 20
    admission.admit("k")
    with pytest.raises(RateLimited):
        admission.admit("k")


def test_tokens_per_minute_are_charged_when_requests_end() -> None:
    clock = Clock()
    admission = Admission(max_concurrent=4, max_queued=0, queue_timeout_s=1, clock=clock)
    admission.limit_key("k", requests_per_minute=None, tokens_per_minute=600)  # 10 a second
    admission.admit("k")
    admission.finished("k", 650)  # the answer was larger than the balance
    with pytest.raises(RateLimited, match="tokens per minute") as caught:
        admission.admit("k")
    assert caught.value.headers == {"Retry-After": "6"}  # 51 tokens short at 10 a second
    clock.now += 5.1
    admission.admit("k")


def test_the_concurrency_cap_queues_a_bounded_number_for_a_bounded_time() -> None:
    async def go() -> None:
        admission = Admission(max_concurrent=1, max_queued=1, queue_timeout_s=0.3)
        release = await admission.acquire()
        waiter = asyncio.create_task(admission.acquire())
        await asyncio.sleep(0.01)
        assert (admission.active, admission.waiting) == (1, 1)
        with pytest.raises(GatewayOverloaded, match="queue is full"):  # the queue holds one
            await admission.acquire()
        release()
        release()  # a second release is harmless
        second = await waiter  # the queued request got the slot
        assert (admission.active, admission.waiting) == (1, 0)
        with pytest.raises(GatewayOverloaded, match="within 0.3 s"):  # nobody frees it in time
            await admission.acquire()
        second()
        (await admission.acquire())()
        assert (admission.active, admission.waiting) == (0, 0)
    asyncio.run(go())


KEY = "sk-limited-0123456789"


@pytest.fixture
def running() -> Iterator[contextlib.ExitStack]:
    with contextlib.ExitStack() as stack:
        yield stack


def test_a_key_over_its_requests_per_minute_gets_a_429_and_vllm_sees_nothing(running) -> None:
    keys = [{"name": "limited", "sha256": hash_key(KEY), "models": ["tiny"], "requests_per_minute": 2}]
    client, service, upstream = start_gateway(running, ok, api_keys=keys)
    headers = {"Authorization": f"Bearer {KEY}"}
    assert [post(client, headers=headers).status_code for _ in range(2)] == [200, 200]
    response = post(client, headers=headers)
    assert response.status_code == 429 and int(response.headers["Retry-After"]) >= 1
    error = error_of(response)
    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
    assert len(upstream.bodies) == 2
    assert service.metrics.registry.get_sample_value(
        "dro_gateway_request_errors_total", {"model": "tiny", "variant": "short", "kind": "rate_limited"}) == 1


def test_a_key_over_its_tokens_per_minute_is_refused_after_the_answer_that_spent_them(running) -> None:
    keys = [{"name": "limited", "sha256": hash_key(KEY), "models": ["tiny"], "tokens_per_minute": 10}]
    client, _, upstream = start_gateway(running, ok, api_keys=keys)  # each answer uses 11 tokens
    headers = {"Authorization": f"Bearer {KEY}"}
    assert post(client, headers=headers).status_code == 200
    response = post(client, headers=headers)
    assert response.status_code == 429 and "tokens per minute" in error_of(response)["message"]
    assert len(upstream.bodies) == 1


def test_streams_hold_their_slot_until_they_end(running) -> None:
    def stream(request: Received) -> Reply:
        return Reply(body=b'data: {"choices": []}\n\ndata: [DONE]\n\n', headers={"Content-Type": "text/event-stream"})
    client, service, _ = start_gateway(running, stream, max_concurrent_requests=1, max_queued_requests=0)
    for _ in range(3):  # each stream frees its slot when it ends, so the next one gets it
        assert post(client, stream=True).status_code == 200
        assert service.admission.active == 0
    assert post(client).status_code == 502  # a non-streaming request whose answer is not JSON frees it too
    assert service.admission.active == 0


def test_the_answer_of_a_full_gateway_is_a_503_overloaded(running) -> None:
    client, service, _ = start_gateway(running, lambda r: Reply(json=answer("x")),
                                       max_concurrent_requests=1, max_queued_requests=0)
    taken = asyncio.run(service.admission.acquire())  # one slot, held elsewhere
    response = post(client)
    assert response.status_code == 503 and response.headers["Retry-After"] == "1"
    assert error_of(response)["code"] == "overloaded"
    taken()
    assert post(client).status_code == 200


def test_a_key_may_have_only_so_many_requests_in_flight() -> None:
    admission = Admission(max_concurrent=8, max_queued=0, queue_timeout_s=1, clock=Clock())
    admission.limit_key("k", requests_per_minute=None, tokens_per_minute=None, max_concurrent=2)
    admission.admit("k")
    admission.admit("k")
    with pytest.raises(RateLimited, match="2 requests in flight") as caught:
        admission.admit("k")
    assert caught.value.status_code == 429 and caught.value.headers == {"Retry-After": "1"}
    admission.admit("other")  # other keys share the global cap only
    admission.finished("k", 5)
    admission.admit("k")


def test_a_keys_in_flight_count_returns_to_zero_however_its_requests_end(running) -> None:
    keys = [{"name": "one-at-a-time", "sha256": hash_key(KEY), "models": ["tiny"], "max_concurrent_requests": 1}]
    outcomes = iter([Reply(json=answer("a")), Reply(500, json={"error": {"message": "x"}}),
                     Reply(body=b'data: {"choices": []}\n\ndata: [DONE]\n\n',
                           headers={"Content-Type": "text/event-stream"}),
                     Reply(json=answer("b"))])
    client, service, _ = start_gateway(running, lambda request: next(outcomes), api_keys=keys)
    headers = {"Authorization": f"Bearer {KEY}"}
    assert post(client, headers=headers).status_code == 200
    assert post(client, headers=headers).status_code == 502  # vLLM failed: the slot is given back all the same
    assert post(client, headers=headers, stream=True).status_code == 200
    assert post(client, headers=headers, messages=[]).status_code == 400  # refused before admission
    assert post(client, headers=headers).status_code == 200
    buckets = service.admission._buckets[hash_key(KEY)]
    assert buckets.in_flight == 0
