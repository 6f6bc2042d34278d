"""GatewayMetrics (gateway/prometheus.py): feed RequestRecords, read the registry back; multi-process aggregation."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from gateway.prometheus import GatewayMetrics
from gateway.telemetry import ERROR_KINDS
from safeprompt.artifact import Manifest
from safeprompt.judge import Verdict
from tests.gateway.records import ROUTE, record


def value(metrics: GatewayMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_own_registry_not_global() -> None:
    from prometheus_client import REGISTRY

    metrics = GatewayMetrics()
    assert metrics.registry is not REGISTRY
    metrics.request_started("m", "v", ROUTE)
    labels = {"model": "m", "variant": "v", "route": ROUTE}
    assert REGISTRY.get_sample_value("dro_gateway_requests_in_flight", labels) is None


def test_success_counts_everything_once() -> None:
    metrics = GatewayMetrics(CollectorRegistry())
    metrics.request_started("smollm2", "dro", ROUTE)
    assert value(metrics, "dro_gateway_requests_in_flight", model="smollm2", variant="dro", route=ROUTE) == 1
    rec = record(verdicts=[Verdict(True, "phrases", "As an AI"), Verdict(False, "phrases", None)])
    metrics.request_finished(rec)
    metrics.request_finished(rec)  # a second report of the same record is ignored

    labels = dict(model="smollm2", variant="dro")
    assert value(metrics, "dro_gateway_requests_in_flight", route=ROUTE, **labels) == 0
    assert value(metrics, "dro_gateway_requests_total", route=ROUTE, status="200", **labels) == 1
    assert value(metrics, "dro_gateway_answers_judged_total", judge="phrases", **labels) == 2
    assert value(metrics, "dro_gateway_refusals_total", judge="phrases", **labels) == 1
    assert value(metrics, "dro_gateway_prompt_tokens_total", **labels) == 40
    assert value(metrics, "dro_gateway_soft_prompt_tokens_total", **labels) == 23
    assert value(metrics, "dro_gateway_completion_tokens_total", **labels) == 12
    assert value(metrics, "dro_gateway_request_duration_seconds_count", route=ROUTE, **labels) == 1
    assert value(metrics, "dro_gateway_request_duration_seconds_sum", route=ROUTE, **labels) == pytest.approx(1.0)
    assert value(metrics, "dro_gateway_time_to_first_token_seconds_sum", route=ROUTE, **labels) == pytest.approx(0.2)
    assert value(metrics, "dro_gateway_overhead_seconds_sum", route=ROUTE, **labels) == pytest.approx(0.1)
    # 1.0 s falls in the 1.0 bucket, not in 0.5.
    assert value(metrics, "dro_gateway_request_duration_seconds_bucket", route=ROUTE, le="1.0", **labels) == 1
    assert value(metrics, "dro_gateway_request_duration_seconds_bucket", route=ROUTE, le="0.5", **labels) == 0
    assert value(metrics, "dro_gateway_request_errors_total", kind="internal", **labels) is None
    # A variant with answers but no refusal shows a refusal count of 0, not a missing series.
    metrics.request_started("smollm2", "default", ROUTE)
    metrics.request_finished(record(variant="default", verdicts=[Verdict(False, "phrases", None)]))
    assert value(metrics, "dro_gateway_refusals_total", model="smollm2", variant="default", judge="phrases") == 0


@pytest.mark.parametrize("kind", ERROR_KINDS)
def test_error_kinds(kind: str) -> None:
    metrics = GatewayMetrics(CollectorRegistry())
    metrics.request_started("smollm2", "dro", ROUTE)
    status = 502 if kind.startswith("upstream") else 400
    metrics.request_finished(record(status=status, error_kind=kind, first_token_s=None, completion_tokens=None))
    labels = dict(model="smollm2", variant="dro")
    assert value(metrics, "dro_gateway_request_errors_total", kind=kind, **labels) == 1
    upstream = value(metrics, "dro_gateway_upstream_errors_total", kind=kind, **labels)
    assert upstream == (1 if kind.startswith("upstream_") else None)
    assert value(metrics, "dro_gateway_requests_total", route=ROUTE, status=str(status), **labels) == 1
    assert value(metrics, "dro_gateway_requests_in_flight", route=ROUTE, **labels) == 0
    assert value(metrics, "dro_gateway_time_to_first_token_seconds_count", route=ROUTE, **labels) is None


def test_mid_stream_failure_counts_partial_verdict() -> None:
    """A stream cut by the client still counts its judged answer and leaves in-flight at 0."""
    metrics = GatewayMetrics(CollectorRegistry())
    metrics.request_started("smollm2", "default", ROUTE)
    metrics.request_finished(record(variant="default", stream=True, error_kind="client_disconnect",
                                    verdicts=[Verdict(True, "paper", "I cannot ")], total_s=None, started_s=0.0))
    labels = dict(model="smollm2", variant="default")
    assert value(metrics, "dro_gateway_refusals_total", judge="paper", **labels) == 1
    assert value(metrics, "dro_gateway_request_errors_total", kind="client_disconnect", **labels) == 1
    assert value(metrics, "dro_gateway_requests_in_flight", route=ROUTE, **labels) == 0
    assert value(metrics, "dro_gateway_request_duration_seconds_count", route=ROUTE, **labels) == 1


def test_refused_before_resolution_never_in_flight() -> None:
    """A request rejected before model resolution was never started: no in-flight decrement."""
    metrics = GatewayMetrics(CollectorRegistry())
    metrics.request_started("smollm2", "dro", ROUTE)  # another request, still running
    metrics.request_finished(record(model="unknown", variant="unknown", status=404,
                                    error_kind="model_not_found", in_flight=False))
    assert value(metrics, "dro_gateway_requests_in_flight", model="smollm2", variant="dro", route=ROUTE) == 1
    assert value(metrics, "dro_gateway_requests_in_flight", model="unknown", variant="unknown", route=ROUTE) is None
    assert value(metrics, "dro_gateway_requests_total", model="unknown", variant="unknown", route=ROUTE,
                 status="404") == 1


def test_unknown_error_kind_is_bounded(caplog: pytest.LogCaptureFixture) -> None:
    metrics = GatewayMetrics(CollectorRegistry())
    metrics.request_started("m", "v", ROUTE)
    with caplog.at_level(logging.ERROR, logger="gateway.prometheus"):
        metrics.request_finished(record(model="m", variant="v", error_kind="free text from somewhere"))
    assert value(metrics, "dro_gateway_request_errors_total", model="m", variant="v", kind="internal") == 1
    assert "unknown error kind" in caplog.text


def test_artifact_info_and_render() -> None:
    metrics = GatewayMetrics(CollectorRegistry())
    manifest = Manifest(name="dro", base_model="smollm2", hidden_size=576, num_virtual_tokens=23,
                        chat_template_sha256="ab" * 32, dtype="float32", origin="dro-trainer")
    metrics.artifact_loaded("smollm2", "dro", manifest)
    metrics.artifact_loaded("smollm2", "default", None)
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    families = {family.name: family for family in text_string_to_metric_families(body.decode())}
    info = families["dro_gateway_artifact_info"].samples
    by_variant = {sample.labels["variant"]: sample for sample in info}
    assert by_variant["dro"].labels["num_virtual_tokens"] == "23"
    assert by_variant["dro"].labels["origin"] == "dro-trainer"
    assert by_variant["dro"].labels["chat_template_sha256"] == "ab" * 6
    assert by_variant["default"].labels["origin"] == "text"
    assert all(sample.value == 1 for sample in info)
    # Prometheus naming: counters end in _total, histograms are in seconds.
    assert "dro_gateway_requests" in families and families["dro_gateway_requests"].type == "counter"
    assert families["dro_gateway_request_duration_seconds"].type == "histogram"


def test_no_request_id_or_user_label() -> None:
    metrics = GatewayMetrics(CollectorRegistry())
    metrics.request_started("smollm2", "dro", ROUTE)
    metrics.request_finished(record(request_id="secret-id-123", user="alice@example.com"))
    body, _ = metrics.render()
    assert b"secret-id-123" not in body and b"alice" not in body


MULTIPROCESS_WORKER = textwrap.dedent("""
    import sys
    from safeprompt.judge import Verdict
    from gateway.prometheus import GatewayMetrics
    from gateway.telemetry import RequestRecord
    metrics = GatewayMetrics()
    assert metrics.multiprocess
    for index in range(int(sys.argv[1])):
        metrics.request_started("m", "v", "/r")
        metrics.request_finished(RequestRecord(
            request_id=str(index), route="/r", model="m", variant="v", in_flight=True, total_s=0.5,
            verdicts=[Verdict(index % 2 == 0, "paper")]))
    metrics.request_started("m", "v", "/r")  # left in flight
    if len(sys.argv) > 2:
        body, _ = metrics.render()
        sys.stdout.write(body.decode())
""")


def test_multiprocess_workers_aggregate(tmp_path: Path) -> None:
    """Two worker processes sharing PROMETHEUS_MULTIPROC_DIR render as one."""
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    first = subprocess.Popen([sys.executable, "-c", MULTIPROCESS_WORKER, "3"], env=env)
    assert first.wait(timeout=60) == 0
    result = subprocess.run([sys.executable, "-c", MULTIPROCESS_WORKER, "4", "render"], env=env, check=True,
                            capture_output=True, text=True)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(result.stdout) for s in family.samples}

    def sample(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted({"model": "m", "variant": "v", **labels}.items())))]

    assert sample("dro_gateway_answers_judged_total", judge="paper") == 7
    assert sample("dro_gateway_refusals_total", judge="paper") == 4  # 2 + 2
    assert sample("dro_gateway_requests_total", route="/r", status="200") == 7
    assert sample("dro_gateway_request_duration_seconds_count", route="/r") == 7
    # livesum: the first worker has exited, but its pid was never marked dead, so it still counts.
    in_flight = sample("dro_gateway_requests_in_flight", route="/r")
    assert in_flight == 2
    # Once a supervisor marks the first worker dead, its in-flight request no longer counts.
    render = textwrap.dedent("""
        import sys
        from prometheus_client import multiprocess
        from gateway.prometheus import GatewayMetrics
        multiprocess.mark_process_dead(int(sys.argv[1]))
        sys.stdout.write(GatewayMetrics().render()[0].decode())
    """)
    result = subprocess.run([sys.executable, "-c", render, str(first.pid)], env=env, check=True,
                            capture_output=True, text=True)
    after = [s.value for family in text_string_to_metric_families(result.stdout) for s in family.samples
             if s.name == "dro_gateway_requests_in_flight"]
    assert after == [1]
