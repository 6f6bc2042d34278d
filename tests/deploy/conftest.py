"""Fixtures for deploy/ integration tests: a real Prometheus (Debian's /usr/bin/prometheus) scraping
loopback targets with the same job names as deploy/prometheus/prometheus.yml, and a small client
for its HTTP query API."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable, Iterator

import httpx
import pytest
import yaml

from stack.processes import ManagedProcess, free_port

PROMETHEUS_BINARY = "/usr/bin/prometheus"
SCRAPE_INTERVAL_S = 1


class PrometheusServer:
    def __init__(self, process: ManagedProcess, port: int) -> None:
        self.process = process
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"

    def query(self, expr: str) -> list[dict]:
        """Instant query; the result vector (list of {metric, value}). Raises on a PromQL error."""
        reply = httpx.get(f"{self.base_url}/api/v1/query", params={"query": expr}, timeout=10.0)
        body = reply.json()
        if reply.status_code != 200 or body.get("status") != "success":
            raise AssertionError(f"Prometheus rejected {expr!r}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]["result"]

    def targets_up(self) -> dict[str, bool]:
        reply = httpx.get(f"{self.base_url}/api/v1/targets", timeout=10.0).json()
        return {target["labels"]["job"]: target["health"] == "up" for target in reply["data"]["activeTargets"]}

    def wait_until(self, condition: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if condition():
                return
            time.sleep(0.5)
        raise TimeoutError(f"Prometheus: {what} not reached within {timeout_s:.0f} s")


@pytest.fixture
def prometheus_factory(tmp_path: Path) -> Iterator[Callable[..., PrometheusServer]]:
    """`prometheus_factory(gateway="127.0.0.1:PORT", vllm="127.0.0.1:PORT")` starts Prometheus
    scraping those targets every second, under the job names the deploy config uses."""
    binary = shutil.which("prometheus") or PROMETHEUS_BINARY
    assert Path(binary).is_file(), "prometheus missing: install the Debian package prometheus (make test does)"
    started: list[ManagedProcess] = []

    def start(**targets: str) -> PrometheusServer:
        config = {
            "global": {"scrape_interval": f"{SCRAPE_INTERVAL_S}s", "evaluation_interval": f"{SCRAPE_INTERVAL_S}s",
                       "scrape_timeout": f"{SCRAPE_INTERVAL_S}s"},
            "scrape_configs": [{"job_name": job, "metrics_path": "/metrics", "static_configs": [{"targets": [address]}]}
                               for job, address in targets.items()],
        }
        folder = tmp_path / f"prometheus-{len(started)}"
        (folder / "data").mkdir(parents=True)
        config_path = folder / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        port = free_port()
        process = ManagedProcess(
            name="prometheus",
            command=[binary, f"--config.file={config_path}", f"--storage.tsdb.path={folder / 'data'}",
                     f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h"],
            log_path=folder / "prometheus.log",
        ).start()
        started.append(process)
        process.wait_http_ok(f"http://127.0.0.1:{port}/-/ready", timeout_s=60)
        return PrometheusServer(process, port)

    try:
        yield start
    finally:
        for process in started:
            process.stop()
