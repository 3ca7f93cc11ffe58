"""Liveness, readiness (database, broker, storage) and Prometheus metrics (operator only: behind its own
bearer token, `DISP_METRICS_TOKEN`; job counts are summed over all tenants)."""

from __future__ import annotations

import hmac

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, Gauge, generate_latest
from sqlalchemy import func, select, text

from api.db.models import Job, JobStatus
from api.db.session import get_engine
from api.deps import BearerDep, SettingsDep
from api.errors import ApiError
from api.queue import ping_broker
from api.storage import get_storage

router = APIRouter(tags=["health"])
JOBS = Gauge("disp_jobs", "Jobs by status (all tenants)", ["status"])


@router.get("/healthz")
def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "A dependency is down; `checks` says which."}})
def readyz(settings: SettingsDep) -> JSONResponse:
    checks: dict[str, str] = {}

    def probe(name: str, fn) -> None:
        try:
            fn()
            checks[name] = "ok"
        except Exception as exc:
            checks[name] = f"error: {type(exc).__name__}: {exc}"[:300]

    def db() -> None:
        with get_engine(settings.database_url).connect() as conn:
            conn.execute(text("SELECT 1"))

    probe("database", db)
    probe("broker", lambda: ping_broker(settings))
    probe("storage", lambda: get_storage(settings).check())
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ok" if ok else "unavailable", "checks": checks}, status_code=200 if ok else 503
    )


@router.get("/metrics", include_in_schema=False)
def metrics(settings: SettingsDep, credentials: BearerDep) -> Response:
    if not settings.metrics_token:
        raise ApiError(404, "not_found", "metrics are off; set DISP_METRICS_TOKEN to serve them")
    given = credentials.credentials if credentials else ""
    if not hmac.compare_digest(given.encode(), settings.metrics_token.encode()):
        raise ApiError(401, "unauthorized", "metrics need 'Authorization: Bearer <DISP_METRICS_TOKEN>'")
    try:
        with get_engine(settings.database_url).connect() as conn:
            counts = dict(conn.execute(select(Job.status, func.count()).group_by(Job.status)).all())
        for status in JobStatus:
            JOBS.labels(status.value).set(counts.get(status.value, 0))
    except Exception:  # metrics stay up when the database is not
        pass
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
