"""Several gateway worker processes behind one port: metrics aggregate across workers.

Which worker answered is read from the Prometheus multi-process directory: every process that
writes a metric writes it to a file named after its pid (`counter_<pid>.db`, ...)."""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path

import httpx
import pytest

from tests.metrics_text import metric_total
from tests.stack.process_tree import children_of

pytestmark = pytest.mark.integration

BATCH = 12
MAX_BATCHES = 5


def writer_pids(metrics_dir: Path, pattern: str) -> set[int]:
    return {int(path.stem.rsplit("_", 1)[1]) for path in metrics_dir.glob(pattern)}


def test_two_workers_count_every_request_once(gateway_factory, vllm_server, tmp_path: Path) -> None:
    """Also the audit's metrics: each worker audits the answers it served (the real vLLM server as the
    judge, every answer sampled) and the scrape sums them to every answer sent; its judge is named
    once, nothing stays pending."""
    metrics_dir = tmp_path / "prometheus"
    metrics_dir.mkdir()
    judge = {"base_url": vllm_server.base_url, "model": vllm_server.served_name, "max_chars": 200}
    served = gateway_factory(workers=2, env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)},
                             audit_judge={"judge": judge, "sample_rate": 1.0})
    # Each worker builds the app (and writes its artifact info); the supervisor builds none. Readiness
    # means one worker answers: the other may still be building, so wait (bounded) for both.
    deadline = time.monotonic() + 60
    builders = writer_pids(metrics_dir, "gauge_livemax_*.db")
    while len(builders) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
        builders = writer_pids(metrics_dir, "gauge_livemax_*.db")
    workers = children_of(served.process.pid)
    assert len(builders) == 2 and builders <= workers and served.process.pid not in builders

    url = f"{served.base_url}/v1/chat/completions"
    body = {"model": "tiny@none", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    sent = 0
    # New connections each time so uvicorn's workers share the load; until both have answered.
    for _ in range(MAX_BATCHES):
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda _: httpx.post(url, json=body, timeout=120), range(BATCH)))
        assert [r.status_code for r in results] == [200] * BATCH
        sent += BATCH
        answering = writer_pids(metrics_dir, "counter_*.db")
        if len(answering) == 2:
            break
    assert answering == builders, "both workers must answer for the aggregate to mean anything"

    with httpx.Client(timeout=120) as client:
        metrics = client.get(f"{served.base_url}/metrics").text
        for _ in range(5):  # whichever worker answers the scrape sees every worker's counts
            again = client.get(f"{served.base_url}/metrics", headers={"Connection": "close"}).text
            assert metric_total(again, "dro_gateway_requests_total", variant="none", status="200") == sent
    assert metric_total(metrics, "dro_gateway_answers_judged_total", variant="none") == sent
    assert metric_total(metrics, "dro_gateway_requests_in_flight", variant="none") == 0

    deadline = time.monotonic() + 120
    with httpx.Client(timeout=120) as client:
        while True:
            metrics = client.get(f"{served.base_url}/metrics", headers={"Connection": "close"}).text
            audited = metric_total(metrics, "dro_gateway_audited_answers_total", variant="none")
            if audited == sent and metric_total(metrics, "dro_gateway_audit_pending") == 0:
                break
            assert time.monotonic() < deadline, f"{audited} of {sent} answers audited"
            time.sleep(0.5)
    assert metric_total(metrics, "dro_gateway_audit_failures_total") == 0
    assert metric_total(metrics, "dro_gateway_audit_judge_info", judge=f"model:ask:{vllm_server.served_name}") == 1
