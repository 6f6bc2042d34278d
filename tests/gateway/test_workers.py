"""Several gateway worker processes behind one port: metrics aggregate across workers."""

from __future__ import annotations

import concurrent.futures

import httpx
import pytest

from tests.metrics_text import metric_total

pytestmark = pytest.mark.integration


def test_two_workers_count_every_request_once(gateway_factory) -> None:
    served = gateway_factory(workers=2)
    url = f"{served.base_url}/v1/chat/completions"
    body = {"model": "tiny@none", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with httpx.Client(timeout=120) as client:
        pids = set()
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            # New connections each time so uvicorn's workers share the load.
            results = list(pool.map(lambda _: httpx.post(url, json=body, timeout=120), range(12)))
        assert [r.status_code for r in results] == [200] * 12
        metrics = client.get(f"{served.base_url}/metrics").text
        for _ in range(5):  # whichever worker answers the scrape sees every worker's counts
            again = client.get(f"{served.base_url}/metrics", headers={"Connection": "close"}).text
            pids.add(again)
            assert metric_total(again, "dro_gateway_requests_total", variant="none", status="200") == 12
    assert metric_total(metrics, "dro_gateway_answers_judged_total", variant="none") == 12
    assert metric_total(metrics, "dro_gateway_requests_in_flight", variant="none") == 0
