"""Job state machine shared by the API and the worker: compare-and-set transitions, each an event row
and (with a webhook URL) a webhook delivery row; progress per shard; the webhook payload."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from api.db.models import (
    RUNNING_STAGES,
    TERMINAL,
    Artifact,
    Job,
    JobEvent,
    JobStatus,
    StageProgress,
    WebhookDelivery,
    as_utc,
    new_id,
    utcnow,
)

NON_TERMINAL = [s for s in JobStatus if s not in TERMINAL]


def add_event(
    session: Session, job_id: str, *, type: str, message: str, level: str = "info", data: dict | None = None
) -> None:
    session.add(JobEvent(job_id=job_id, type=type, message=message, level=level, data=data or {}))


def webhook_event_type(status: str) -> str:
    return f"job.{status}" if status in TERMINAL else "job.stage_changed"


def webhook_payload(session: Session, job: Job, event_type: str, msg_id: str) -> str:
    artifact_ids = session.scalars(select(Artifact.id).where(Artifact.job_id == job.id).order_by(Artifact.id))
    body = {
        "id": msg_id,
        "type": event_type,
        "created_at": int(utcnow().timestamp()),
        "data": {
            "job_id": job.id,
            "status": job.status,
            "stage": job.stage,
            "metrics": job.metrics,
            "artifact_ids": list(artifact_ids),
            "error": job.error,
        },
    }
    return json.dumps(body, separators=(",", ":"), sort_keys=True)


def transition(
    session: Session,
    job_id: str,
    to: JobStatus,
    *,
    expect: list[JobStatus] | JobStatus,
    message: str | None = None,
    error: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    events: Sequence[dict[str, Any]] = (),
) -> str | None:
    """Move a job from one of `expect` to `to`; return a webhook delivery id ('' if none), or None if
    the job was no longer in an expected state (another worker or a cancel got there first).
    `events` (`add_event` keywords) are recorded before the status event, only when the job moves.
    The caller commits, then enqueues the delivery."""
    expected = [expect] if isinstance(expect, str) else list(expect)
    now = utcnow()
    values: dict[str, Any] = {"status": to}
    if to in RUNNING_STAGES:
        values.update(stage=to, stage_started_at=now)
    if to in RUNNING_STAGES and expected == [JobStatus.queued]:  # the plan's first stage
        values["started_at"] = now
    if to in TERMINAL:
        values["finished_at"] = now
    if error is not None:
        values["error"] = error
    if metrics is not None:
        values["metrics"] = metrics
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(expected))
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        return None
    job = session.get(Job, job_id)
    session.refresh(job)
    for event in events:
        add_event(session, job_id, **event)
    level = "error" if to in (JobStatus.failed, JobStatus.failed_validation) else "info"
    add_event(
        session,
        job_id,
        type="status",
        level=level,
        message=message or f"status: {to}",
        data={"status": to, "stage": job.stage, **({"error": error} if error else {})},
    )
    if not job.webhook_url:
        return ""
    delivery_id = new_id("msg")
    event_type = webhook_event_type(to)
    session.add(
        WebhookDelivery(
            id=delivery_id,
            job_id=job_id,
            event_type=event_type,
            url=job.webhook_url,
            payload=webhook_payload(session, job, event_type, delivery_id),
        )
    )
    return delivery_id


def set_progress(session: Session, job_id: str, stage: str, shard: int, done: int, total: int) -> None:
    row = session.get(StageProgress, (job_id, stage, shard))
    if row is None:
        session.add(StageProgress(job_id=job_id, stage=stage, shard=shard, done=done, total=total))
    else:
        row.done, row.total, row.updated_at = done, total, utcnow()


def progress(session: Session, job: Job) -> tuple[int, int]:
    """(done, total) summed over the shards of the job's current stage."""
    if job.stage is None:
        return 0, 0
    done, total = session.execute(
        select(
            func.coalesce(func.sum(StageProgress.done), 0), func.coalesce(func.sum(StageProgress.total), 0)
        ).where(StageProgress.job_id == job.id, StageProgress.stage == job.stage)
    ).one()
    return int(done), int(total)


def eta(job: Job, done: int, total: int) -> datetime | None:
    """Linear extrapolation of the current stage from its start."""
    started = as_utc(job.stage_started_at)
    if job.status not in RUNNING_STAGES or started is None or done <= 0 or total <= done:
        return None
    elapsed = utcnow() - started
    return utcnow() + elapsed * ((total - done) / done)
