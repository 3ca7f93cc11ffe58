"""Jobs, their events and artifacts; pagination by cursor (`after` = last id seen)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api import jobstate
from api.config import ApiSettings
from api.db.models import (
    TERMINAL,
    Artifact,
    Checkpoint,
    Dataset,
    Job,
    JobEvent,
    JobStatus,
    UploadStatus,
)
from api.errors import ApiError, not_found
from api.schemas import JobCreate, JobOut, Progress
from api.storage import Storage


def page(rows: list[Any], limit: int) -> tuple[list[Any], bool]:
    return rows[:limit], len(rows) > limit


def check_webhook_url(url: str, *, allow_private: bool) -> None:
    from api.webhooks import WebhookTargetError, check_target

    try:
        check_target(url, allow_private=allow_private)
    except WebhookTargetError as exc:
        raise ApiError(422, "invalid_webhook_url", str(exc), "webhook_url") from None


def validate_settings(settings: dict[str, Any]) -> None:
    """Refuse what the service cannot run. (The values were checked by the schema, which runs
    `disp.config`'s own checks; disp.config and disp.stages are stdlib-only, so the API may import them.)"""
    from disp.stages import DEFENSES

    defense = DEFENSES[settings.get("defense", "disp")]
    if defense.needs_manifest:
        raise ApiError(
            422,
            "invalid_settings",
            f"{defense.name} needs the attack's manifest; the service does not take one",
            "settings.defense",
        )


def _input(session: Session, model, object_id: str, tenant_id: str, kind: str):
    """The tenant's dataset or checkpoint, share-locked until commit so that it cannot be deleted under a
    job being created."""
    row = session.get(model, object_id, with_for_update={"read": True})
    if row is None or row.tenant_id != tenant_id or row.status == UploadStatus.deleted:
        raise not_found(kind, object_id, f"{kind}_id")
    return row


def create_job(*, session: Session, settings: ApiSettings, tenant_id: str, body: JobCreate) -> Job:
    dataset = _input(session, Dataset, body.dataset_id, tenant_id, "dataset")
    checkpoint = _input(session, Checkpoint, body.checkpoint_id, tenant_id, "checkpoint")
    for row, param in ((dataset, "dataset_id"), (checkpoint, "checkpoint_id")):
        if row.status == UploadStatus.invalid:
            raise ApiError(422, "invalid_input", f"{row.id} failed validation: {row.error}", param)
    if len(body.metadata) > 16:
        raise ApiError(422, "invalid_request", "metadata holds at most 16 pairs", "metadata")
    if body.webhook_url:
        check_webhook_url(body.webhook_url, allow_private=settings.webhook_allow_private)
    config = body.settings.model_dump()
    validate_settings(config)
    metadata = dict(body.metadata)
    if body.shard_size:
        metadata["shard_size"] = str(body.shard_size)
    job = Job(
        tenant_id=tenant_id,
        dataset_id=dataset.id,
        checkpoint_id=checkpoint.id,
        settings=config,
        webhook_url=body.webhook_url,
        metadata_=metadata,
    )
    session.add(job)
    session.flush()
    jobstate.add_event(
        session,
        job.id,
        type="status",
        message="status: validating",
        data={"status": JobStatus.validating, "stage": None},
    )
    return job


def count_active(*, session: Session, tenant_id: str) -> int:
    """The tenant's jobs not yet finished (its quota counts these)."""
    query = (
        select(func.count()).select_from(Job).where(Job.tenant_id == tenant_id, Job.status.not_in(TERMINAL))
    )
    return int(session.scalar(query) or 0)


def list_jobs(
    *,
    session: Session,
    tenant_id: str,
    limit: int,
    after: str | None,
    status: str | None,
    metadata: Sequence[tuple[str, str]] = (),
) -> tuple[list[Job], bool]:
    """A page of the tenant's jobs, newest first; `metadata`: (key, value) pairs the job's metadata must hold."""
    query = select(Job).where(Job.tenant_id == tenant_id).order_by(Job.id.desc()).limit(limit + 1)
    if after:
        query = query.where(Job.id < after)
    if status:
        query = query.where(Job.status == status)
    for key, value in metadata:
        query = query.where(Job.metadata_[key].as_string() == value)
    return page(list(session.scalars(query)), limit)


def job_out(*, session: Session, job: Job) -> JobOut:
    done, total = jobstate.progress(session, job)
    artifact_ids = (  # registered when the job succeeds (worker.orchestrate.finish)
        list(session.scalars(select(Artifact.id).where(Artifact.job_id == job.id).order_by(Artifact.id)))
        if job.status == JobStatus.succeeded
        else []
    )
    return JobOut(
        id=job.id,
        status=job.status,
        stage=job.stage,
        progress=Progress(stage=job.stage, done=done, total=total),
        eta=jobstate.eta(job, done, total),
        metrics=job.metrics or {},
        error=job.error,
        dataset_id=job.dataset_id,
        checkpoint_id=job.checkpoint_id,
        settings=job.settings,
        webhook_url=job.webhook_url,
        metadata=job.metadata_ or {},
        cancel_requested=job.cancel_requested,
        artifact_ids=artifact_ids,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
    )


def request_cancel(*, session: Session, job: Job) -> str | None:
    """Flag the job; before any GPU stage it is cancelled at once, otherwise the worker stops between
    batches. Returns a webhook delivery id to enqueue after commit ('' or None when there is none)."""
    if job.status in TERMINAL:
        raise ApiError(409, "job_finished", f"job {job.id} already {job.status}")
    job.cancel_requested = True
    jobstate.add_event(session, job.id, type="message", message="cancellation requested")
    session.flush()
    return jobstate.transition(
        session,
        job.id,
        JobStatus.cancelled,
        expect=[JobStatus.validating, JobStatus.queued],
        message="cancelled before start",
    )


def list_events(
    *, session: Session, job_id: str, limit: int, after: int | None
) -> tuple[list[JobEvent], bool]:
    query = select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id).limit(limit + 1)
    if after is not None:
        query = query.where(JobEvent.id > after)
    return page(list(session.scalars(query)), limit)


def delete_job(*, session: Session, storage: Storage, job: Job) -> None:
    """Delete a finished job: every object under its storage prefix (stage outputs and artifacts), then the
    row with its events, artifacts and progress (cascading). A job still running is refused with 409."""
    session.refresh(job, with_for_update=True)
    if job.status not in TERMINAL:
        raise ApiError(
            409, "job_not_finished", f"job {job.id} is {job.status}; cancel it and wait until it is cancelled"
        )
    from api.services.files import object_prefix

    storage.delete_prefix(object_prefix(job.tenant_id, "jobs", job.id))
    session.delete(job)


def list_artifacts(*, session: Session, job_id: str) -> list[Artifact]:
    return list(session.scalars(select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.id)))
