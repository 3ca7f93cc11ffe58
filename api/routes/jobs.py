"""Jobs: create, list, get, cancel, events, artifacts."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from api.db.models import JobStatus
from api.deps import CurrentJob, IdempotencyKey, SessionDep, SettingsDep, StorageDep, TenantDep
from api.errors import responses
from api.queue import VALIDATE_JOB
from api.routes.artifacts import artifact_out
from api.routes.common import After, Limit, send, send_webhook
from api.schemas import BIGINT_MAX, ArtifactList, EventList, EventOut, JobCreate, JobList, JobOut
from api.services import jobs

router = APIRouter(prefix="/jobs", tags=["jobs"])


@router.post(
    "",
    status_code=201,
    response_model=JobOut,
    dependencies=[IdempotencyKey],
    responses=responses(400, 401, 404, 409, 413, 422, 503),
)
def create_job(body: JobCreate, session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> JobOut:
    """Start a defense run; it is validated before any GPU time is spent."""
    job = jobs.create_job(session=session, settings=settings, tenant_id=tenant.id, body=body)
    session.commit()
    send(settings, VALIDATE_JOB, job_id=job.id)
    return jobs.job_out(session=session, job=job)


@router.get("", response_model=JobList, responses=responses(401, 422))
def list_jobs(
    session: SessionDep,
    tenant: TenantDep,
    limit: Limit = 20,
    after: After = None,
    status: Annotated[JobStatus | None, Query()] = None,
) -> dict:
    rows, has_more = jobs.list_jobs(
        session=session, tenant_id=tenant.id, limit=limit, after=after, status=status
    )
    data = [jobs.job_out(session=session, job=j) for j in rows]
    return {"data": data, "has_more": has_more, "next_cursor": data[-1].id if has_more else None}


@router.get("/{job_id}", response_model=JobOut, responses=responses(401, 404, 422))
def get_job(job: CurrentJob, session: SessionDep) -> JobOut:
    return jobs.job_out(session=session, job=job)


@router.post(
    "/{job_id}/cancel",
    response_model=JobOut,
    dependencies=[IdempotencyKey],
    responses=responses(400, 401, 404, 409, 413, 422),
)
def cancel_job(job: CurrentJob, session: SessionDep, settings: SettingsDep) -> JobOut:
    """Cooperative: a running stage stops between batches; poll until `cancelled`."""
    delivery = jobs.request_cancel(session=session, job=job)
    session.commit()
    send_webhook(settings, delivery)
    session.refresh(job)
    return jobs.job_out(session=session, job=job)


@router.get("/{job_id}/events", response_model=EventList, responses=responses(401, 404, 422))
def list_events(
    job: CurrentJob,
    session: SessionDep,
    limit: Limit = 50,
    after: Annotated[
        int | None, Query(ge=0, le=BIGINT_MAX, description="Cursor: last event id seen.")
    ] = None,
) -> dict:
    rows, has_more = jobs.list_events(session=session, job_id=job.id, limit=limit, after=after)
    data = [EventOut.model_validate(r, from_attributes=True) for r in rows]
    return {"data": data, "has_more": has_more, "next_cursor": str(data[-1].id) if data else None}


@router.get("/{job_id}/artifacts", response_model=ArtifactList, responses=responses(401, 404, 422))
def list_artifacts(job: CurrentJob, session: SessionDep, settings: SettingsDep, storage: StorageDep) -> dict:
    rows = jobs.list_artifacts(session=session, job_id=job.id)
    return {"data": [artifact_out(a, settings, storage) for a in rows], "has_more": False}


@router.delete(
    "/{job_id}", status_code=204, response_class=Response, responses=responses(401, 404, 409, 422, 503)
)
def delete_job(job: CurrentJob, session: SessionDep, storage: StorageDep) -> Response:
    """Delete a finished job with its events, artifacts and every stored output; refused (409) while it runs
    (cancel it first)."""
    jobs.delete_job(session=session, storage=storage, job=job)
    session.commit()
    return Response(status_code=204)
