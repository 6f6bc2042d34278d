"""The app factory: builds the FastAPI gateway from one `Settings` object, plus its small routes.

`build_app(settings)` builds the `Service` (loading and validating every artifact, refusing to build
on a mismatch), keeps it on `app.state.service`, installs the error handlers and registers the
routes, which get the service through the `get_service` dependency. The lifespan starts the
upstream pool (its HTTP sessions, made in the running event loop, and health checks) and the audit's
workers when an audit judge is configured, and stops them (the audit first: it discards what is
pending rather than wait for its judge).
Nothing is created at import time.
`create_app()` is the zero-argument factory uvicorn uses (settings from the environment and
`GATEWAY_CONFIG`).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from gateway.auth import bearer_matches
from gateway.completions import ROUTE, create_chat_completion
from gateway.errors import Unauthorized, install_error_handlers
from gateway.openapi import install_openapi
from gateway.service import Service, build_service, get_service
from gateway.settings import Settings
from safeprompt.prompts import VARIANT_SEPARATOR

ServiceDependency = Annotated[Service, Depends(get_service)]


def build_app(settings: Settings) -> FastAPI:
    """The gateway for `settings` (tests point `upstream_urls` at a server on loopback)."""
    service = build_service(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.pool.start()
        auditor = service.auditor
        try:
            if auditor is not None:
                await auditor.start()
            yield
        finally:
            if auditor is not None:
                await auditor.stop()
            await service.pool.stop()

    app = FastAPI(title="DRO safety gateway", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = service
    install_error_handlers(app)
    app.add_api_route(ROUTE, create_chat_completion, methods=["POST"])
    app.add_api_route("/v1/models", list_models, methods=["GET"])
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/ready", ready, methods=["GET"])
    app.add_api_route("/metrics", serve_metrics, methods=["GET"])
    install_openapi(app, ROUTE)
    return app


def create_app() -> FastAPI:
    """uvicorn factory: settings from the environment and the YAML file in GATEWAY_CONFIG."""
    return build_app(Settings())


async def list_models(request: Request, service: ServiceDependency) -> JSONResponse:
    """Every model-variant pair as its own id, plus each bare model name (its default variant); with
    API keys configured, only those the caller's key may use (401 without a valid key)."""
    key = service.keys.authenticate(request.headers.get("authorization"))
    data = []
    for model in service.models.values():
        for model_id in model.model_ids():
            variant = model_id.partition(VARIANT_SEPARATOR)[2] or None
            if key is not None and not key.may_use(model.name, variant or model.default_variant):
                continue
            data.append(
                {
                    "id": model_id,
                    "object": "model",
                    "created": service.created,
                    "owned_by": "dro-gateway",
                    "root": model.upstream_name,
                    "variant": variant,
                    "default_variant": model.default_variant if variant is None else None,
                    "split": model.split or None if variant is None else None,
                }
            )
    return JSONResponse({"object": "list", "data": data})


async def health() -> JSONResponse:
    """Liveness: the process answers."""
    return JSONResponse({"status": "ok"})


async def ready(request: Request, service: ServiceDependency) -> JSONResponse:
    """Readiness: artifacts are loaded (they were at build time) and an upstream answers /health.

    The details (upstream URLs and errors, models) only with the metrics token, when one is set."""
    pool = service.pool
    if not pool.any_healthy:
        await pool.check_health()
    ok = pool.any_healthy
    body: dict[str, object] = {"status": "ready" if ok else "not_ready"}
    token = service.settings.metrics_token_sha256
    if token is None or bearer_matches(request.headers.get("authorization"), token):
        body["upstreams"] = [{"url": u.url, "healthy": u.healthy, "error": u.last_error} for u in pool.upstreams]
        body["models"] = {name: sorted(model.variants) for name, model in service.models.items()}
    return JSONResponse(body, status_code=200 if ok else 503)


async def serve_metrics(request: Request, service: ServiceDependency) -> Response:
    """Prometheus exposition; 401 without the metrics token when one is set."""
    token = service.settings.metrics_token_sha256
    if token is not None and not bearer_matches(request.headers.get("authorization"), token):
        raise Unauthorized("/metrics needs the metrics token: 'Authorization: Bearer TOKEN'")
    body, content_type = service.metrics.render()
    return Response(body, media_type=content_type)
