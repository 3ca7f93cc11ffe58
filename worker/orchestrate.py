"""Moves a job through its stages. Every stage (shard) ends with its output in storage, so `advance_job` can
be called any number of times (after each shard, redelivery, restart) and always resumes at the first stage
whose output is missing. Transitions are compare-and-set, so duplicates are harmless. There are no chords:
each finished shard calls `advance_job`, and the one that finds every shard stored moves the job on (a shard
stores its output before it calls, so the last one always sees them all)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from typing import Any

from celery import signature

from api import jobstate
from api.db.models import (
    TERMINAL,
    Artifact,
    Checkpoint,
    Dataset,
    Job,
    JobStatus,
    UploadStatus,
)
from api.db.session import session_scope
from api.queue import ADVANCE_JOB, DELIVER_WEBHOOK, QUEUE_OF, RUN_STAGE
from api.storage import Storage
from disp.stages import STAGES, plan
from worker import keys
from worker.config import WorkerSettings

log = logging.getLogger(__name__)


def job_plan(job: Job) -> list[JobStatus]:
    """The job's running stages, in order: its defense's plan (`disp.stages`)."""
    return [JobStatus(s.name) for s in plan(job.settings.get("defense", "disp"))]


def _sig(app, settings: WorkerSettings, task: str, **kwargs: Any):
    return signature(task, kwargs=kwargs, queue=settings.queue(QUEUE_OF[task]), app=app, immutable=True)


def notify(app, settings: WorkerSettings, delivery_id: str | None) -> None:
    if delivery_id:
        _sig(app, settings, DELIVER_WEBHOOK, delivery_id=delivery_id).apply_async()


def move(app, settings: WorkerSettings, job_id: str, to: JobStatus, *, expect, **kw: Any) -> bool:
    with session_scope(settings.database_url) as session:
        delivery = jobstate.transition(session, job_id, to, expect=expect, **kw)
    notify(app, settings, delivery)
    return delivery is not None


def fail(app, settings: WorkerSettings, job_id: str, code: str, message: str, stage: str | None) -> None:
    error = {"code": code, "message": message[:4000], "stage": stage}
    status = JobStatus.failed_validation if stage == JobStatus.validating else JobStatus.failed
    move(
        app,
        settings,
        job_id,
        status,
        expect=jobstate.NON_TERMINAL,
        error=error,
        message=f"{status}: {message[:200]}",
    )


def cancel(app, settings: WorkerSettings, job_id: str) -> None:
    move(app, settings, job_id, JobStatus.cancelled, expect=jobstate.NON_TERMINAL, message="cancelled")


def validate_job(app, settings: WorkerSettings, job_id: str) -> str:
    """'wait' while inputs are still being validated; otherwise queue the job or fail it."""
    with session_scope(settings.database_url) as session:
        job = session.get(Job, job_id)
        if job is None or job.status != JobStatus.validating:
            return "skip"
        if job.cancel_requested:
            return "cancel"
        dataset = session.get(Dataset, job.dataset_id)
        checkpoint = session.get(Checkpoint, job.checkpoint_id)
        pending = [r for r in (dataset, checkpoint) if r.status == UploadStatus.validating]
        bad = [r for r in (dataset, checkpoint) if r.status == UploadStatus.invalid]
        shard_size = int((job.metadata_ or {}).get("shard_size") or settings.shard_size)
        num_shards = max(1, math.ceil((dataset.num_records or 1) / shard_size))
    if bad:
        row = bad[0]
        fail(
            app,
            settings,
            job_id,
            (row.error or {}).get("code", "invalid_input"),
            f"{row.id}: {(row.error or {}).get('message', 'failed validation')}",
            JobStatus.validating,
        )
        return "failed"
    if pending:
        return "wait"
    with session_scope(settings.database_url) as session:
        session.get(Job, job_id).num_shards = num_shards
    if move(
        app, settings, job_id, JobStatus.queued, expect=JobStatus.validating, message="inputs valid; queued"
    ):
        _sig(app, settings, ADVANCE_JOB, job_id=job_id).apply_async()
    return "queued"


def _dispatch(
    app, settings: WorkerSettings, job: Job, stage: JobStatus, shards: list[int] | None = None
) -> None:
    """Queue the stage's work: one task per shard of a sharded stage, one task otherwise; each advances
    the job when it is done."""
    if STAGES[stage].sharded:
        todo = shards if shards is not None else list(range(job.num_shards))
        _announce_shards(settings, job, stage, todo)
        for i in todo:
            _sig(app, settings, RUN_STAGE, job_id=job.id, stage=str(stage), shard=i).apply_async()
    else:
        _sig(app, settings, RUN_STAGE, job_id=job.id, stage=str(stage), shard=0).apply_async()


def _announce_shards(settings: WorkerSettings, job: Job, stage: JobStatus, shards: list[int]) -> None:
    """Progress rows with each shard's size, so the stage's total is known before its shards start."""
    from api.db.models import StageProgress
    from worker.stages import shard_indices

    with session_scope(settings.database_url) as session:
        records = session.get(Dataset, job.dataset_id).num_records or 0
        for i in shards:
            if session.get(StageProgress, (job.id, stage, i)) is None:
                total = len(shard_indices(records, job.num_shards, i))
                jobstate.set_progress(session, job.id, stage, i, 0, total)


def stage_done(storage: Storage, job: Job, stage: JobStatus) -> list[int] | bool:
    """True when the stage's output is in storage; for sharded stages, the list of missing shards."""
    if storage.exists(keys.output(job, STAGES[stage].writes)):
        return True
    if STAGES[stage].sharded:
        missing = [i for i in range(job.num_shards) if not storage.exists(keys.shard(job, stage, i))]
        return missing or True
    return False


def advance(app, settings: WorkerSettings, storage: Storage, job_id: str, *, resume: bool = False) -> None:
    """Take the job one step; `resume` (after a restart of a broker that lost its messages: `disp serve`)
    re-dispatches the current stage's missing work."""
    with session_scope(settings.database_url) as session:
        job = session.get(Job, job_id)
        if job is None or job.status in TERMINAL:
            return
        session.expunge(job)
    if job.cancel_requested:
        cancel(app, settings, job_id)
        return
    stages = job_plan(job)
    if job.status == JobStatus.validating:
        return
    if job.status == JobStatus.queued:
        if move(app, settings, job_id, stages[0], expect=JobStatus.queued, message=f"started: {stages[0]}"):
            _dispatch(app, settings, job, stages[0])
        return
    stage = JobStatus(job.status)
    done = stage_done(storage, job, stage)
    if done is not True:
        # The stage's other shards are queued or running (the broker holds their messages until they
        # finish): the last of them moves the job on.
        if resume:
            log.warning("job %s: resuming %s (%s)", job_id, stage, done or "the stage")
            _dispatch(app, settings, job, stage, done if isinstance(done, list) else None)
        return
    if STAGES[stage].sharded:
        from worker.stages import merge_stage

        merge_stage(settings, storage, job, stage)
    if stage == stages[-1]:
        finish(app, settings, storage, job)
        return
    nxt = stages[stages.index(stage) + 1]
    if move(
        app,
        settings,
        job_id,
        nxt,
        expect=stage,
        message=f"{stage} done; started: {nxt}",
        events=stage_events(str(stage), stored_metrics(storage, job, stage)),
    ):
        _dispatch(app, settings, job, nxt)


def stored_metrics(storage: Storage, job: Job, stage: str) -> dict:
    """A finished stage's metrics (its shards' merged); {} where none are stored."""
    from worker.stages import merge_metrics

    shards = range(job.num_shards) if STAGES[stage].sharded else range(1)
    found = [k for k in (keys.metrics(job, stage, i) for i in shards) if storage.exists(k)]
    return merge_metrics([json.loads(storage.read_bytes(k)) for k in found]) if found else {}


def stage_events(stage: str, metrics: dict, warnings: Sequence[str] = ()) -> list[dict]:
    """The events a finished stage leaves: one per fine-tuning epoch with its loss, one with the stage's metrics,
    and one warning event per warning of the report."""
    events = []
    losses = metrics.get("epoch_losses") or []
    for i, loss in enumerate(losses, 1):
        events.append(
            {
                "type": "metrics",
                "message": f"{stage} epoch {i}/{len(losses)}: loss {loss:.4f}",
                "data": {"stage": stage, "epoch": i, "epochs": len(losses), "loss": loss},
            }
        )
    if metrics:
        shown = ", ".join(f"{k}={v}" for k, v in metrics.items() if isinstance(v, int | float | str))
        events.append(
            {
                "type": "metrics",
                "message": f"{stage}: {shown}"[:2000],
                "data": {"stage": stage, "metrics": metrics},
            }
        )
    events += [{"type": "message", "level": "warn", "message": w, "data": {"stage": stage}} for w in warnings]
    return events


def finish(app, settings: WorkerSettings, storage: Storage, job: Job) -> None:
    """Register the artifacts, copy the report's summary into the job's metrics, and succeed."""
    report = json.loads(storage.read_bytes(keys.output(job, STAGES["evaluating"].writes)))
    with session_scope(settings.database_url) as session:
        have = {a.kind for a in session.query(Artifact).filter(Artifact.job_id == job.id)}
        for kind, key, filename in keys.artifacts(job):
            if kind in have or not storage.exists(key):
                continue
            session.add(
                Artifact(
                    tenant_id=job.tenant_id,
                    job_id=job.id,
                    kind=kind,
                    filename=filename,
                    storage_key=key,
                    bytes=storage.size(key) or 0,
                    sha256=object_sha256(storage, key),
                )
            )
    move(
        app,
        settings,
        job.id,
        JobStatus.succeeded,
        expect=job_plan(job)[-1],
        metrics=report.get("summary", {}),
        message="succeeded",
        events=stage_events("evaluating", report.get("summary", {}), report.get("warnings", [])),
    )


def object_sha256(storage: Storage, key: str) -> str:
    digest = hashlib.sha256()
    for chunk in storage.iter_chunks(key):
        digest.update(chunk)
    return digest.hexdigest()
