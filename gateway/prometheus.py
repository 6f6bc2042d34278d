"""The gateway's Prometheus metrics: one class that owns its own registry.

`GatewayMetrics` turns the app's request lifecycle (`request_started`, then `request_finished`
with the `RequestRecord` exactly once) into counters, histograms and gauges, and serves them as the
Prometheus text format. It knows the metric names, labels and buckets; it knows nothing about HTTP,
upstreams or how verdicts are made (it counts the `Verdict`s the record carries).

Labels are bounded on purpose: model and variant come from the gateway's configuration, route
from its own routes, status is an HTTP code, `kind` is one of `telemetry.ERROR_KINDS`, `judge` a
registered judge name. The audit's metrics (`gateway.audit`) add `live` and `audit` (a verdict
label: refusal, compliance, unknown), `reason` (one of `telemetry.AUDIT_FAILURE_REASONS`) and the
audit judge's name (one per process). Never user ids, request ids or prompt text.

Multi-process: when `PROMETHEUS_MULTIPROC_DIR` is set (before prometheus_client is first imported,
which is when it chooses its value store), every worker writes its values to files there and
`render()` aggregates all workers with `MultiProcessCollector`; the in-flight gauge sums live
workers and the artifact info gauge takes the max over live workers ("live": files of processes not
marked dead with `prometheus_client.multiprocess.mark_process_dead`; uvicorn, which restarts a
crashed worker, does not mark it, see docs/metrics.md).
"""

from __future__ import annotations

import logging
import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from gateway.telemetry import AUDIT_FAILURE_REASONS, ERROR_KINDS, RequestRecord

logger = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# End-to-end latency of a whole answer: CPU vLLM answers take seconds, long streams a minute.
LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
# Time to first token: prefill only, usually well under the full latency.
TTFT_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# The gateway's own work (validation, splice, judging, relaying): milliseconds.
OVERHEAD_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

UPSTREAM_ERROR_KINDS = tuple(kind for kind in ERROR_KINDS if kind.startswith("upstream_"))


class GatewayMetrics:
    """All gateway metrics, in a registry of their own (never the global default registry)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.multiprocess = bool(os.environ.get(MULTIPROC_ENV)) and registry is None
        if self.multiprocess:
            # Values live in the shared directory; the metric objects are registered nowhere and
            # the render registry reads every worker's files.
            metric_registry = None
            self.registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(self.registry)
        else:
            self.registry = registry if registry is not None else CollectorRegistry()
            metric_registry = self.registry
        r = metric_registry

        self.requests = Counter(
            "dro_gateway_requests",
            "Requests answered, by model, variant, route and HTTP status.",
            ("model", "variant", "route", "status"),
            registry=r,
        )
        self.in_flight = Gauge(
            "dro_gateway_requests_in_flight",
            "Requests accepted and not yet finished.",
            ("model", "variant", "route"),
            registry=r,
            multiprocess_mode="livesum",
        )
        self.answers_judged = Counter(
            "dro_gateway_answers_judged",
            "Answers (choices) judged for refusal.",
            ("model", "variant", "judge"),
            registry=r,
        )
        self.refusals = Counter(
            "dro_gateway_refusals",
            "Answers (choices) the judge called a refusal.",
            ("model", "variant", "judge"),
            registry=r,
        )
        self.latency = Histogram(
            "dro_gateway_request_duration_seconds",
            "End-to-end latency: request accepted to last byte sent.",
            ("model", "variant", "route"),
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.ttft = Histogram(
            "dro_gateway_time_to_first_token_seconds",
            "Request accepted to the first content token.",
            ("model", "variant", "route"),
            buckets=TTFT_BUCKETS_S,
            registry=r,
        )
        self.overhead = Histogram(
            "dro_gateway_overhead_seconds",
            "Time the gateway itself added: latency minus time waiting on vLLM.",
            ("model", "variant", "route"),
            buckets=OVERHEAD_BUCKETS_S,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "dro_gateway_prompt_tokens",
            "Prompt tokens as vLLM counts them (soft-prompt rows included).",
            ("model", "variant"),
            registry=r,
        )
        self.soft_prompt_tokens = Counter(
            "dro_gateway_soft_prompt_tokens",
            "Soft-prompt rows sent (part of the prompt tokens).",
            ("model", "variant"),
            registry=r,
        )
        self.completion_tokens = Counter(
            "dro_gateway_completion_tokens", "Completion tokens generated.", ("model", "variant"), registry=r
        )
        self.request_errors = Counter(
            "dro_gateway_request_errors",
            "Requests that ended in an error, by error kind.",
            ("model", "variant", "kind"),
            registry=r,
        )
        self.upstream_errors = Counter(
            "dro_gateway_upstream_errors",
            "Failures of the vLLM upstream, by kind.",
            ("model", "variant", "kind"),
            registry=r,
        )
        self.artifact_info = Gauge(
            "dro_gateway_artifact_info",
            "Soft-prompt artifact loaded for a model's variant (value 1).",
            (
                "model",
                "variant",
                "artifact",
                "origin",
                "num_virtual_tokens",
                "hidden_size",
                "chat_template_sha256",
                "forced",
            ),
            registry=r,
            multiprocess_mode="livemax",
        )
        # The sampled audit of live verdicts by a model judge (gateway.audit): a confusion matrix
        # of the live judge's verdict against the audit judge's, on choice 0 of sampled answers.
        self.audited_answers = Counter(
            "dro_gateway_audited_answers",
            "Sampled answers re-judged by the audit judge, by the live verdict and the audit judge's.",
            ("model", "variant", "live", "audit"),
            registry=r,
        )
        self.audit_failures = Counter(
            "dro_gateway_audit_failures",
            "Sampled answers the audit judge did not judge, by reason.",
            ("reason",),
            registry=r,
        )
        self.audit_pending = Gauge(
            "dro_gateway_audit_pending",
            "Sampled answers waiting for the audit judge (queued or being judged).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.audit_judge_info = Gauge(
            "dro_gateway_audit_judge_info",
            "The model judge auditing live verdicts (value 1).",
            ("judge",),
            registry=r,
            multiprocess_mode="livemax",
        )

    # --- lifecycle -----------------------------------------------------------------------------

    def request_started(self, model: str, variant: str, route: str) -> None:
        """A request was accepted (model and variant resolved): in flight +1. The app then sets
        `record.in_flight = True`; exactly one `request_finished` with the same model, variant and
        route follows."""
        self.in_flight.labels(model, variant, route).inc()

    def request_finished(self, record: RequestRecord) -> None:
        """Account one finished request (success, error, disconnect alike). Idempotent per record."""
        if record.accounted:
            logger.warning("request %s reported finished twice; counted once", record.request_id)
            return
        record.accounted = True
        record.finish()
        model, variant, route = record.model, record.variant, record.route
        if record.in_flight:
            # Requests refused before resolution (bad JSON, unknown model) were never in flight.
            self.in_flight.labels(model, variant, route).dec()
            record.in_flight = False
        self.requests.labels(model, variant, route, str(record.status)).inc()

        for verdict in record.verdicts:
            self.answers_judged.labels(model, variant, verdict.judge).inc()
            # Touch the refusal series even when it stays 0, so a refusal rate of 0 is a value on
            # the dashboard, not a missing series.
            refusals = self.refusals.labels(model, variant, verdict.judge)
            if verdict.refusal:
                refusals.inc()

        if record.total_s is not None:
            self.latency.labels(model, variant, route).observe(record.total_s)
        if record.first_token_s is not None:
            self.ttft.labels(model, variant, route).observe(record.first_token_s)
        if record.overhead_s is not None:
            self.overhead.labels(model, variant, route).observe(record.overhead_s)

        if record.prompt_tokens:
            self.prompt_tokens.labels(model, variant).inc(record.prompt_tokens)
        if record.completion_tokens:
            self.completion_tokens.labels(model, variant).inc(record.completion_tokens)
        if record.soft_prompt_tokens:
            self.soft_prompt_tokens.labels(model, variant).inc(record.soft_prompt_tokens)

        if record.error_kind is not None:
            kind = record.error_kind
            if kind not in ERROR_KINDS:
                # A label must stay bounded: an unknown kind is a gateway bug, counted as such.
                logger.error("request %s has unknown error kind %r; counted as 'internal'", record.request_id, kind)
                kind = "internal"
            self.request_errors.labels(model, variant, kind).inc()
            if kind in UPSTREAM_ERROR_KINDS:
                self.upstream_errors.labels(model, variant, kind).inc()

    def artifact_loaded(self, model: str, variant: str, manifest) -> None:
        """Expose one loaded soft-prompt artifact (a `safeprompt.artifact.Manifest`) as an info metric.

        Text variants (no artifact) pass `manifest=None` and are shown with origin "text"."""
        if manifest is None:
            labels = (model, variant, "", "text", "0", "0", "", "false")
        else:
            labels = (
                model,
                variant,
                manifest.name,
                manifest.origin,
                str(manifest.num_virtual_tokens),
                str(manifest.hidden_size),
                (manifest.chat_template_sha256 or "")[:12],
                "true" if manifest.forced else "false",
            )
        self.artifact_info.labels(*labels).set(1)

    # --- the audit (gateway.audit) --------------------------------------------------------------

    def audit_configured(self, judge: str) -> None:
        """An audit judge named `judge` is configured: its info series, and every failure reason's
        series at 0 (so a failure rate of 0 is a value on the dashboard, not a missing series)."""
        self.audit_judge_info.labels(judge).set(1)
        for reason in AUDIT_FAILURE_REASONS:
            self.audit_failures.labels(reason)

    def answer_audited(self, model: str, variant: str, *, live: bool, audit: str) -> None:
        """One sampled answer judged by the audit judge; `audit` is refusal, compliance or unknown."""
        self.audited_answers.labels(model, variant, "refusal" if live else "compliance", audit).inc()

    def audit_failed(self, reason: str) -> None:
        if reason not in AUDIT_FAILURE_REASONS:
            logger.error("audit failure reason %r is unknown; counted as 'internal'", reason)
            reason = "internal"
        self.audit_failures.labels(reason).inc()

    # --- exposition ----------------------------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of every metric, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
