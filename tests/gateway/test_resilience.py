"""vLLM killed under load (`make test-resilience`; not in `make test`: it starts, kills and restarts a
vLLM server of its own, minutes on two cores).

64 concurrent streams (300 forced tokens each) go through the real gateway process to a real vLLM
CPU server; vLLM's whole process group gets SIGKILL while they run. Every request must end either
whole ([DONE], no error) or cleanly (an HTTP error with an OpenAI envelope, or, mid-stream, one error
event then [DONE]): none may hang or break off silently. vLLM is restarted on the same port; the
gateway must find it by itself (/ready 200 again, no restart of the gateway) and answer new
requests; its request counter must equal the requests sent. The outcome counts are printed
(docs/security.md quotes them).
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import time

import httpx
import orjson
import pytest
import yaml

from stack.processes import free_port, start_gateway, start_vllm
from tests.metrics_text import metric_total

pytestmark = [pytest.mark.resilience, pytest.mark.integration]

STREAMS = 64
TOKENS = 300


async def one_stream(client: httpx.AsyncClient, started: asyncio.Event, counter: list[int]) -> str:
    body = {"model": "tiny@none", "messages": [{"role": "user", "content": "Tell me a story."}], "stream": True,
            "max_tokens": TOKENS, "min_tokens": TOKENS, "temperature": 0}
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                error = orjson.loads(await response.aread())["error"]
                assert error["message"] and error["type"]
                return f"http_{response.status_code}"
            events = []
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 1:
                        counter[0] += 1
                        if counter[0] == STREAMS:
                            started.set()
    except httpx.HTTPError as exc:
        return f"broken:{type(exc).__name__}"
    if not events or events[-1] != "[DONE]":
        return "broken:no_done"
    if len(events) >= 2 and events[-2].startswith('{"error"'):
        return "error_event:" + orjson.loads(events[-2])["error"]["code"]
    return "complete"


async def load_and_kill(base_url: str, vllm_pgid: int) -> list[str]:
    started, counter = asyncio.Event(), [0]
    async with httpx.AsyncClient(base_url=base_url, timeout=120,
                                 limits=httpx.Limits(max_connections=STREAMS)) as client:
        tasks = [asyncio.create_task(one_stream(client, started, counter)) for _ in range(STREAMS)]
        try:
            await asyncio.wait_for(started.wait(), 120)  # every stream is flowing
        except TimeoutError:
            pass  # kill anyway: the ones not yet flowing must end cleanly too
        os.killpg(vllm_pgid, signal.SIGKILL)
        return await asyncio.wait_for(asyncio.gather(*tasks), 180)


def test_sigkill_of_vllm_under_64_streams(tiny_model_dir, tmp_path) -> None:
    vllm_port, gateway_port = free_port(), free_port()
    vllm = start_vllm(tiny_model_dir, served_model_name="tiny-llama", port=vllm_port, log_path=tmp_path / "vllm.log",
                      dtype="float32", max_model_len=2048)
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump({
        "upstream_urls": [f"http://127.0.0.1:{vllm_port}"], "health_interval_s": 1,
        "models": [{"name": "tiny", "upstream_model": "tiny-llama", "model_path": str(tiny_model_dir)}]}))
    gateway = start_gateway(config, port=gateway_port, log_path=tmp_path / "gateway.log")
    base = f"http://127.0.0.1:{gateway_port}"
    try:
        before = httpx.get(f"{base}/metrics").text
        outcomes = asyncio.run(load_and_kill(base, vllm.process.pid))
        counts = collections.Counter(outcome.split(":")[0] if outcome.startswith("broken") else outcome
                                     for outcome in outcomes)
        print(f"\nafter SIGKILL of vLLM under {STREAMS} streams: {dict(counts)}")
        assert not [o for o in outcomes if o.startswith("broken")], outcomes
        assert len(outcomes) == STREAMS

        killed_at = time.monotonic()
        vllm.process.wait(timeout=30)  # reap the killed server
        vllm = start_vllm(tiny_model_dir, served_model_name="tiny-llama", port=vllm_port,
                          log_path=tmp_path / "vllm-2.log", dtype="float32", max_model_len=2048)
        deadline = time.monotonic() + 60
        while httpx.get(f"{base}/ready", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, "the gateway did not find the restarted vLLM"
            time.sleep(0.5)
        print(f"gateway ready again {time.monotonic() - killed_at:.0f} s after the kill (vLLM restart included)")
        for _ in range(8):
            answer = httpx.post(f"{base}/v1/chat/completions", timeout=60, json={
                "model": "tiny@none", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8})
            assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"]
        after = httpx.get(f"{base}/metrics").text
        sent = STREAMS + 8
        assert metric_total(after, "dro_gateway_requests_total") - metric_total(before, "dro_gateway_requests_total") == sent
    finally:
        gateway.stop()
        vllm.stop()
