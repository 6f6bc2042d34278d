"""The app factory: builds the FastAPI gateway from one `Settings` object.

`build_app(settings)` loads and validates every served model's artifacts (refusing to build on a
mismatch), builds the judge and metrics, and registers the routes; the upstream HTTP client is made
in the lifespan (or handed in by tests) and kept with everything else on `app.state`. Nothing is
created at import time. `create_app()` is the zero-argument factory uvicorn uses (settings from the
environment and `GATEWAY_CONFIG`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import AsyncIterator

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from gateway.chat import create_chat_completion
from gateway.errors import install_error_handlers
from safeprompt.judge import get_judge
from gateway.metrics import GatewayMetrics
from gateway.settings import Settings
from gateway.upstream import UpstreamPool, build_client
from gateway.variants import ServedModel, load_model

logger = logging.getLogger("gateway")


def build_app(settings: Settings, *, client: httpx.AsyncClient | None = None,
              metrics: GatewayMetrics | None = None) -> FastAPI:
    models: dict[str, ServedModel] = {config.name: load_model(config) for config in settings.models}
    judge = get_judge(settings.judge)
    metrics = metrics or GatewayMetrics()
    for model in models.values():
        for variant in model.variants.values():
            # Text variants are listed too (manifest None), so dashboards show every variant.
            metrics.artifact_loaded(model.name, variant.name, variant.manifest)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = client is None
        http = client or build_client(
            connect_timeout_s=settings.connect_timeout_s, read_timeout_s=settings.read_timeout_s,
            api_key=settings.upstream_api_key.get_secret_value() if settings.upstream_api_key else None)
        app.state.pool = UpstreamPool(settings.upstream_urls, http, health_interval_s=settings.health_interval_s)
        await app.state.pool.start()
        try:
            yield
        finally:
            await app.state.pool.stop()
            if owned:
                await http.aclose()

    app = FastAPI(title="DRO safety gateway", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.state.models = models
    app.state.judge = judge
    app.state.metrics = metrics
    app.state.created = int(time.time())
    install_error_handlers(app)

    app.add_api_route("/v1/chat/completions", create_chat_completion, methods=["POST"])
    app.add_api_route("/v1/models", list_models, methods=["GET"])
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/ready", ready, methods=["GET"])
    app.add_api_route("/metrics", serve_metrics, methods=["GET"])
    return app


def create_app() -> FastAPI:
    """uvicorn factory: settings from the environment and the YAML file in GATEWAY_CONFIG."""
    return build_app(Settings())


async def list_models(request: Request) -> JSONResponse:
    """Every model-variant pair as its own id, plus each bare model name (its default variant)."""
    state = request.app.state
    data = []
    for model in state.models.values():
        for model_id in model.model_ids():
            variant = model_id.partition("@")[2] or None
            data.append({
                "id": model_id,
                "object": "model",
                "created": state.created,
                "owned_by": "dro-gateway",
                "root": model.upstream_name,
                "variant": variant,
                "default_variant": model.default_variant if variant is None else None,
                "split": model.split or None if variant is None else None,
            })
    return JSONResponse({"object": "list", "data": data})


async def health(request: Request) -> JSONResponse:
    """Liveness: the process answers."""
    return JSONResponse({"status": "ok"})


async def ready(request: Request) -> JSONResponse:
    """Readiness: artifacts are loaded (they were at build time) and an upstream answers /health."""
    pool: UpstreamPool = request.app.state.pool
    if not pool.any_healthy:
        await pool.check_health()
    upstreams = [{"url": u.url, "healthy": u.healthy, "error": u.last_error} for u in pool.upstreams]
    models = {name: sorted(model.variants) for name, model in request.app.state.models.items()}
    ok = pool.any_healthy
    return JSONResponse({"status": "ready" if ok else "not_ready", "upstreams": upstreams, "models": models},
                        status_code=200 if ok else 503)


async def serve_metrics(request: Request) -> Response:
    body, content_type = request.app.state.metrics.render()
    return Response(body, media_type=content_type)
