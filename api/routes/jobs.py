"""Jobs: create, list, get, cancel, events (paged, or streamed as server-sent events), artifacts.
GET on a job or the job list answers `ETag`; `If-None-Match` with it gives 304 while nothing changed."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from api.db.models import TERMINAL, Job, JobStatus
from api.db.session import session_scope
from api.deps import CurrentJob, IdempotencyKey, SessionDep, SettingsDep, StorageDep, TenantDep
from api.errors import ApiError, responses
from api.limits import check_active_jobs, check_rate
from api.queue import VALIDATE_JOB
from api.routes.artifacts import artifact_out
from api.routes.common import After, Limit, send, send_webhook
from api.schemas import BIGINT_MAX, ArtifactList, EventList, EventOut, JobCreate, JobList, JobOut
from api.services import jobs

router = APIRouter(prefix="/jobs", tags=["jobs"])
NOT_MODIFIED = {304: {"description": "Not modified: `If-None-Match` holds the current `ETag`"}}


def conditional(request: Request, model: BaseModel) -> Response:
    """The model as JSON with a strong ETag over its bytes; 304 without a body when the client has it."""
    body = model.model_dump_json().encode()
    etag = f'"{hashlib.sha256(body).hexdigest()[:32]}"'
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    sent = request.headers.get("if-none-match", "")
    if etag in [t.strip().removeprefix("W/") for t in sent.split(",")] or sent.strip() == "*":
        return Response(status_code=304, headers=headers)
    return Response(body, media_type="application/json", headers=headers)


_METADATA_PARAM = re.compile(r"metadata(?:\.(.+)|\[(.+)\])", re.DOTALL)


def metadata_filters(request: Request) -> list[tuple[str, str]]:
    """The `metadata.KEY=VALUE` / `metadata[KEY]=VALUE` query parameters, checked as job metadata is."""
    out = []
    for name, value in request.query_params.multi_items():
        match = _METADATA_PARAM.fullmatch(name)
        if match is None:
            continue
        key = match.group(1) or match.group(2)
        if len(key) > 64 or len(value) > 512 or "\x00" in key + value:
            raise ApiError(
                422,
                "invalid_request",
                "a metadata filter's key is 1-64 characters, its value at most 512",
                name,
            )
        out.append((key, value))
    if len(out) > 16:
        raise ApiError(422, "invalid_request", f"at most 16 metadata filters, got {len(out)}", "metadata")
    return out


@router.post(
    "",
    status_code=201,
    response_model=JobOut,
    dependencies=[IdempotencyKey],
    responses=responses(400, 401, 404, 409, 413, 422, 503),
)
def create_job(body: JobCreate, session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> JobOut:
    """Start a defense run; it is validated before any GPU time is spent. Per tenant, job creation has its
    own rate limit and the number of unfinished jobs a quota (429 `rate_limited` / `quota_exceeded`)."""
    check_rate(settings, tenant.id, kind="jobs")
    check_active_jobs(settings, jobs.count_active(session=session, tenant_id=tenant.id))
    job = jobs.create_job(session=session, settings=settings, tenant_id=tenant.id, body=body)
    session.commit()
    send(settings, VALIDATE_JOB, job_id=job.id)
    return jobs.job_out(session=session, job=job)


@router.get("", response_model=JobList, responses={**responses(401, 422), **NOT_MODIFIED})
def list_jobs(
    request: Request,
    session: SessionDep,
    tenant: TenantDep,
    limit: Limit = 20,
    after: After = None,
    status: Annotated[JobStatus | None, Query()] = None,
) -> Response:
    """The tenant's jobs, newest first. Filter by `status` and by metadata: `metadata.KEY=VALUE` (or
    `metadata[KEY]=VALUE`) keeps the jobs whose metadata holds KEY with exactly VALUE; several filters must
    all hold (at most 16)."""
    rows, has_more = jobs.list_jobs(
        session=session,
        tenant_id=tenant.id,
        limit=limit,
        after=after,
        status=status,
        metadata=metadata_filters(request),
    )
    data = [jobs.job_out(session=session, job=j) for j in rows]
    page = JobList(data=data, has_more=has_more, next_cursor=data[-1].id if has_more else None)
    return conditional(request, page)


@router.get("/{job_id}", response_model=JobOut, responses={**responses(401, 404, 422), **NOT_MODIFIED})
def get_job(request: Request, job: CurrentJob, session: SessionDep) -> Response:
    return conditional(request, jobs.job_out(session=session, job=job))


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


@router.get(
    "/{job_id}/events/stream",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "Server-sent events"},
        **responses(401, 404, 422),
    },
)
async def stream_events(
    job: CurrentJob,
    session: SessionDep,
    request: Request,
    settings: SettingsDep,
    after: Annotated[int | None, Query(description="Start after this event id.")] = None,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", include_in_schema=False)] = None,
) -> StreamingResponse:
    """The job's events as server-sent events instead of polling: each stored event (`id:` = its id,
    `event:` = its type), an `event: job` with the job object whenever its status or progress changes, and
    `event: end` once the job is finished. Reconnect with `Last-Event-ID` to resume; a stream ends after
    `stream_max_s` (the client reconnects)."""
    cursor = int(last_event_id) if last_event_id and last_event_id.isdigit() else after
    job_id = job.id
    session.close()  # give the connection back: each poll below takes one briefly

    def poll(since: int | None) -> tuple[list[EventOut], JobOut]:
        with session_scope(settings.database_url) as session:
            rows, _ = jobs.list_events(session=session, job_id=job_id, limit=100, after=since)
            current = session.get(Job, job_id)
            return [EventOut.model_validate(r, from_attributes=True) for r in rows], jobs.job_out(
                session=session, job=current
            )

    async def frames():
        nonlocal cursor
        yield f"retry: {int(settings.stream_poll_s * 1000)}\n\n"
        deadline, last_job, quiet_since = time.monotonic() + settings.stream_max_s, None, time.monotonic()
        while time.monotonic() < deadline and not await request.is_disconnected():
            events, state = await run_in_threadpool(poll, cursor)
            for event in events:
                cursor = event.id
                yield f"id: {event.id}\nevent: {event.type}\ndata: {event.model_dump_json()}\n\n"
            snapshot = state.model_dump_json(exclude={"eta"})
            if snapshot != last_job:
                last_job = snapshot
                yield f"event: job\ndata: {state.model_dump_json()}\n\n"
            if events or snapshot != last_job:
                quiet_since = time.monotonic()
            if state.status in TERMINAL and len(events) < 100:
                yield f"event: end\ndata: {json.dumps({'status': state.status})}\n\n"
                return
            if time.monotonic() - quiet_since > 15:
                quiet_since = time.monotonic()
                yield ": keep-alive\n\n"
            await asyncio.sleep(settings.stream_poll_s if len(events) < 100 else 0)

    return StreamingResponse(
        frames(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


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
