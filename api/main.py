"""The FastAPI application: `create_app(settings)`; `app` for `uvicorn api.main:app`."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI

from api import errors
from api.config import ApiSettings, get_settings
from api.db.session import configure_pool
from api.idempotency import Idempotency, purge_expired
from api.limits import Admission
from api.middleware import RequestContext
from api.routes import artifacts, checkpoints, console, datasets, health, jobs, models, tenant, uploads

log = logging.getLogger(__name__)
SHED = errors.responses(429, 503)  # any /v1 operation may shed load or hit a tenant's limit


def create_app(settings: ApiSettings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_pool(
        settings.database_url,
        size=settings.db_pool_size,
        overflow=settings.db_pool_overflow,
        timeout_s=settings.db_pool_timeout_s,
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        if settings.run_migrations:
            from api.migrate import upgrade

            upgrade(settings.database_url)
        try:
            purge_expired(settings.database_url, settings.idempotency_ttl_s)
        except Exception:  # not fatal: the table may be missing when migrations are off
            log.warning("could not purge idempotency keys", exc_info=True)
        yield

    app = FastAPI(
        title="disp",
        summary="Backdoor removal for multimodal masked-diffusion language models (DiSP), as a service.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    errors.install(app)
    v1 = APIRouter(prefix="/v1", responses=SHED)
    for module in (datasets, checkpoints, models, uploads, jobs, artifacts, tenant):
        v1.include_router(module.router)
    app.include_router(v1)
    app.include_router(health.router)
    app.include_router(console.router)
    # Outermost first: request id + body limit + metrics wrap admission control (load shedding), which
    # wraps idempotency, which wraps the routes.
    app.add_middleware(Idempotency, database_url=settings.database_url, max_body=settings.max_upload_bytes)
    app.add_middleware(Admission, settings=settings)
    app.add_middleware(
        RequestContext, max_body=settings.max_upload_bytes, max_json_body=settings.max_json_body_bytes
    )
    return app


def __getattr__(name: str):  # `uvicorn api.main:app` builds the app from the environment on first use
    if name == "app":
        return create_app()
    raise AttributeError(name)
