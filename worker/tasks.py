"""Celery tasks: thin, take ids, idempotent (a finished stage is skipped), retries narrow and declarative."""

from __future__ import annotations

import logging
import random

from botocore.exceptions import ConnectionClosedError, EndpointConnectionError
from celery import shared_task
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlalchemy.exc import OperationalError

from api.archive import ArchiveError
from api.db.models import Checkpoint, Dataset, JobStatus
from api.db.session import session_scope
from api.errors import public_message
from api.queue import (
    ADVANCE_JOB,
    DELIVER_WEBHOOK,
    RUN_STAGE,
    VALIDATE_CHECKPOINT,
    VALIDATE_DATASET,
    VALIDATE_JOB,
)
from api.storage import get_storage
from worker import orchestrate, stages, validation
from worker.config import get_worker_settings
from worker.lease import LeaseHeld, StageLease
from worker.webhooks import DeliveryFailed, deliver

log = logging.getLogger(__name__)

TRANSIENT = (EndpointConnectionError, ConnectionClosedError, OperationalError, RedisConnectionError)
RETRY = {
    "autoretry_for": TRANSIENT,
    "retry_backoff": 5,
    "retry_backoff_max": 300,
    "retry_jitter": True,
    "max_retries": 8,
}


def _settings():
    return get_worker_settings()


def _validate(model, object_id: str, check) -> None:
    """Run a validation; an unexpected error marks the upload invalid rather than leaving it pending."""
    settings = _settings()
    try:
        with session_scope(settings.database_url) as session:
            check(session=session, storage=get_storage(settings), settings=settings)
    except TRANSIENT:
        raise
    except Exception as exc:
        log.exception("validating %s failed", object_id)
        with session_scope(settings.database_url) as session:
            validation.mark_invalid(
                session.get(model, object_id),
                "validation_error",
                f"{type(exc).__name__}: {exc}",
                (settings.work_dir,),
            )


@shared_task(name=VALIDATE_DATASET, ignore_result=True, **RETRY)
def validate_dataset(dataset_id: str) -> None:
    _validate(Dataset, dataset_id, lambda **kw: validation.validate_dataset(dataset_id=dataset_id, **kw))


@shared_task(name=VALIDATE_CHECKPOINT, ignore_result=True, **RETRY)
def validate_checkpoint(checkpoint_id: str) -> None:
    _validate(
        Checkpoint,
        checkpoint_id,
        lambda **kw: validation.validate_checkpoint(checkpoint_id=checkpoint_id, **kw),
    )


@shared_task(name=VALIDATE_JOB, bind=True, ignore_result=True, max_retries=None)
def validate_job(self, job_id: str) -> str:
    settings = _settings()
    outcome = orchestrate.validate_job(self.app, settings, job_id)
    if outcome == "wait":  # dataset or checkpoint still being validated
        if self.request.retries * settings.validation_retry_s > settings.validation_wait_s:
            orchestrate.fail(
                self.app,
                settings,
                job_id,
                "validation_timeout",
                "inputs were not validated in time",
                JobStatus.validating,
            )
            return "failed"
        raise self.retry(countdown=settings.validation_retry_s)
    if outcome == "cancel":
        orchestrate.cancel(self.app, settings, job_id)
    return outcome


@shared_task(name=ADVANCE_JOB, bind=True, **RETRY)
def advance_job(self, job_id: str, resume: bool = False) -> None:
    settings = _settings()
    orchestrate.advance(self.app, settings, get_storage(settings), job_id, resume=resume)


def _run(app, job_id: str, stage: str, shard: int) -> str:
    """Run one stage (shard) under its lease; map its outcome onto the job (cancelled, failed) instead of
    raising. Transient infrastructure errors are retried; `LeaseHeld` (another worker runs it) is raised."""
    from disp.data import DataError
    from disp.models import CheckpointError
    from disp.pipeline import Cancelled

    settings = _settings()
    lease = None
    try:
        if stages.cancel_pending(settings, job_id):  # asked while this task waited in the queue
            orchestrate.cancel(app, settings, job_id)
            return "cancelled"
        ctx = stages.load_context(settings, get_storage(settings), job_id, stage, shard)
        if ctx is None:
            return "skipped"
        if ctx.storage.exists(stages.output_key(ctx.job, stage, shard)):
            return "done"  # a redelivered copy of finished work
        lease = StageLease(settings.database_url, job_id, stage, shard, ttl=settings.lease_ttl_s)
        lease.acquire()
        ctx.reporter.lease = lease
        stages.run(ctx, shard)
    except Cancelled:
        if lease is not None and lease.lost:
            return "lease_lost"  # the worker that took the lease over finishes the stage
        orchestrate.cancel(app, settings, job_id)
        return "cancelled"
    except LeaseHeld:
        raise
    except TRANSIENT:
        raise
    except (DataError, CheckpointError, ArchiveError) as exc:
        message = public_message(str(exc), (settings.work_dir,))
        orchestrate.fail(app, settings, job_id, "invalid_input", message, stage)
        return "failed"
    except Exception as exc:
        log.exception("job %s: %s failed", job_id, stage)
        message = public_message(f"{type(exc).__name__}: {exc}", (settings.work_dir,))
        orchestrate.fail(app, settings, job_id, "stage_failed", message, stage)
        return "failed"
    finally:
        if lease is not None:
            lease.release()
    return "done"


@shared_task(name=RUN_STAGE, bind=True, **RETRY)
def run_stage(self, job_id: str, stage: str, shard: int = 0) -> str:
    """One stage of `disp.stages` (one shard of a sharded stage), then `advance_job`. While another worker
    holds the shard's lease the task comes back when that lease would expire (it never runs beside it)."""
    try:
        outcome = _run(self.app, job_id, stage, shard)
    except LeaseHeld as held:
        log.info(
            "job %s: %s shard %d is running elsewhere (%s); checking again later", job_id, stage, shard, held
        )
        raise self.retry(countdown=min(held.wait, _settings().lease_ttl_s) + 1, max_retries=None) from None
    if outcome == "done":
        advance_job.apply_async(kwargs={"job_id": job_id}, queue=_settings().queue("gpu"))
    return outcome


@shared_task(name=DELIVER_WEBHOOK, bind=True, ignore_result=True, max_retries=None)
def deliver_webhook(self, delivery_id: str) -> str:
    settings = _settings()
    try:
        return deliver(settings, delivery_id)
    except DeliveryFailed as exc:
        attempt = self.request.retries
        delay = settings.webhook_backoff_s * (2**attempt) * random.uniform(0.8, 1.2)
        log.warning(
            "webhook %s attempt %d failed (%s); retrying in %.1fs", delivery_id, attempt + 1, exc, delay
        )
        raise self.retry(countdown=delay) from exc
