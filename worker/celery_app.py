"""The Celery application: `celery -A worker.celery_app worker` (queues from DISP_QUEUES, pool solo)."""

from __future__ import annotations

from celery import Celery
from kombu import Exchange, Queue

from api.queue import celery_config
from worker.config import get_worker_settings

settings = get_worker_settings()

app = Celery("disp-worker")
app.conf.update(celery_config(settings))
app.conf.update(
    task_queues=[
        Queue(name, Exchange(name, type="direct"), routing_key=name)
        for name in (settings.queue(q.strip()) for q in settings.queues.split(",") if q.strip())
    ],
    worker_pool=settings.pool,
    worker_concurrency=settings.concurrency,
    worker_prefetch_multiplier=1,
    task_time_limit=settings.task_time_limit_s,
    task_track_started=True,
    worker_max_tasks_per_child=50,  # prefork only: bounds slow memory growth
    worker_cancel_long_running_tasks_on_connection_loss=False,
    worker_hijack_root_logger=False,
)
app.autodiscover_tasks(["worker"], force=True)
import worker.tasks  # noqa: E402,F401  (register the tasks)
