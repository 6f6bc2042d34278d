"""The gateway's service object: everything a route needs, built once by the app factory.

`Service` holds the settings, the served models with their variants, the client API keys, the
refusal judge, the Prometheus metrics, the upstream pool, admission control (rates, concurrency)
and, when an audit judge is configured, the `Auditor`. `build_service(settings)` loads and validates
every artifact (raising `ArtifactError` on a mismatch) and registers the variants with the metrics;
the HTTP sessions of the pool and the auditor are made later, in the app's lifespan
(`UpstreamPool.start`, `Auditor.start`). Routes get the service through the FastAPI dependency
`get_service`. Nothing here is created at import time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from fastapi import Request

from gateway.accounting import Accounting
from gateway.admission import Admission
from gateway.audit import Auditor
from gateway.auth import KeyRing
from gateway.prometheus import GatewayMetrics
from gateway.settings import Settings
from gateway.telemetry import RequestRecord
from gateway.upstream import ClientConfig, Ejection, UpstreamPool
from gateway.variants import ServedModel, load_model
from safeprompt.judge import Judge, get_judge


@dataclass(frozen=True)
class Service:
    settings: Settings
    models: dict[str, ServedModel]
    keys: KeyRing
    judge: Judge
    metrics: GatewayMetrics
    pool: UpstreamPool
    admission: Admission
    auditor: Auditor | None = None  # the sampled audit of live verdicts (settings.audit_judge)
    created: int = field(default_factory=lambda: int(time.time()))  # the models' `created` field

    def accounting(self, request_id: str, route: str) -> Accounting:
        """A new request's accounting, reporting to this service's metrics and request log."""
        record = RequestRecord(request_id=request_id, route=route, judge=self.judge.name)
        return Accounting(
            record,
            judge=self.judge,
            metrics=self.metrics,
            log_prompts=self.settings.log_prompts,
            auditor=self.auditor,
        )


def load_models(settings: Settings) -> dict[str, ServedModel]:
    """Every served model with its variants; raises ArtifactError when an artifact does not fit."""
    return {config.name: load_model(config) for config in settings.models}


def check_settings(settings: Settings) -> None:
    """Everything that can make the gateway refuse to start, without building it: artifacts, judge,
    API keys."""
    load_models(settings)
    KeyRing.from_settings(settings)
    get_judge(settings.judge)


def build_service(settings: Settings) -> Service:
    """The service for `settings`."""
    models = load_models(settings)
    metrics = GatewayMetrics()
    for model in models.values():
        for variant in model.variants.values():
            # Text variants are listed too (manifest None), so dashboards show every variant.
            metrics.artifact_loaded(model.name, variant.name, variant.manifest)
    api_key = settings.upstream_api_key.get_secret_value() if settings.upstream_api_key else None
    pool = UpstreamPool(
        settings.upstream_urls,
        ClientConfig(
            connect_timeout_s=settings.connect_timeout_s, read_timeout_s=settings.read_timeout_s, api_key=api_key
        ),
        health_interval_s=settings.health_interval_s,
        ejection=Ejection(base_s=settings.eject_base_s, max_s=settings.eject_max_s, after_5xx=settings.eject_after_5xx),
    )
    keys = KeyRing.from_settings(settings)
    admission = Admission(
        max_concurrent=settings.max_concurrent_requests,
        max_queued=settings.max_queued_requests,
        queue_timeout_s=settings.queue_timeout_s,
    )
    for key in keys.keys:
        admission.limit_key(
            key.limit_id,
            requests_per_minute=key.requests_per_minute,
            tokens_per_minute=key.tokens_per_minute,
            max_concurrent=key.max_concurrent_requests,
        )
    auditor = None
    if settings.audit_judge is not None:
        auditor = Auditor(settings.audit_judge, metrics)
        metrics.audit_configured(settings.audit_judge.judge.name)
    return Service(
        settings=settings,
        models=models,
        keys=keys,
        judge=get_judge(settings.judge),
        metrics=metrics,
        pool=pool,
        admission=admission,
        auditor=auditor,
    )


async def get_service(request: Request) -> Service:
    """FastAPI dependency: the service of the app that received `request`.

    `async` on purpose: FastAPI runs a plain `def` dependency in a worker thread, a hop that cost
    ~20% of the gateway's CPU per request in the profile (docs/performance.md)."""
    service = request.app.state.service
    if not isinstance(service, Service):
        raise RuntimeError("the app was not built by gateway.app.build_app")
    return service
