"""Celery wiring shared by producer (API) and consumer (worker): task names, queues, configuration.

The API enqueues by task NAME and passes ids only, so it never imports the worker, disp.models or torch.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from api.config import CommonSettings

VALIDATE_DATASET = "worker.tasks.validate_dataset"
VALIDATE_CHECKPOINT = "worker.tasks.validate_checkpoint"
VALIDATE_JOB = "worker.tasks.validate_job"
ADVANCE_JOB = "worker.tasks.advance_job"
RUN_STAGE = "worker.tasks.run_stage"  # one stage of `disp.stages` (one shard of a sharded stage)
DELIVER_WEBHOOK = "worker.tasks.deliver_webhook"

GPU, CPU = "gpu", "cpu"
QUEUE_OF = {
    VALIDATE_DATASET: CPU,
    VALIDATE_CHECKPOINT: CPU,
    VALIDATE_JOB: CPU,
    DELIVER_WEBHOOK: CPU,
    ADVANCE_JOB: GPU,
    RUN_STAGE: GPU,
}


def celery_config(settings: CommonSettings) -> dict[str, Any]:
    """Broker, result backend and delivery guarantees; the worker adds its own process settings."""
    redis_broker = settings.broker_url.startswith(("redis", "rediss"))
    transport = dict(settings.broker_transport_options)
    if redis_broker:
        transport = {"visibility_timeout": settings.visibility_timeout_s, **transport}
    conf: dict[str, Any] = {
        "broker_url": settings.broker_url,
        "result_backend": settings.result_backend,
        "task_ignore_result": True,  # job state is in the database; no task waits on another's result
        "broker_transport_options": transport,
        "result_backend_transport_options": {"visibility_timeout": settings.visibility_timeout_s},
        "broker_connection_retry_on_startup": True,
        "broker_heartbeat": settings.broker_heartbeat_s if settings.broker_url.startswith("amqp") else 0,
        "task_routes": {name: {"queue": settings.queue(q)} for name, q in QUEUE_OF.items()},
        "task_default_queue": settings.queue(CPU),
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "result_expires": 7 * 24 * 3600,
        # Redelivery: ack after the task ran, requeue when the worker process dies (tasks are idempotent;
        # a stage's lease keeps a redelivered copy from running beside a live original).
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
    }
    if redis_broker:
        conf["visibility_timeout"] = settings.visibility_timeout_s
    return conf


_producers: dict[str, Celery] = {}


def producer(settings: CommonSettings) -> Celery:
    """A Celery app that only sends (one per distinct configuration)."""
    conf = celery_config(settings)
    key = repr(sorted((k, repr(v)) for k, v in conf.items()))
    if key not in _producers:
        app = Celery("disp-api", set_as_current=False)
        app.conf.update(conf)
        _producers[key] = app
    return _producers[key]


def enqueue(settings: CommonSettings, task: str, **kwargs: Any) -> None:
    """Send `task` by name to its queue with keyword arguments (ids only)."""
    producer(settings).send_task(task, kwargs=kwargs, queue=settings.queue(QUEUE_OF[task]))


def ping_broker(settings: CommonSettings, timeout: float = 2.0) -> None:
    with producer(settings).connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=timeout)
