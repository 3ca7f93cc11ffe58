"""Settings of the worker process (DISP_* environment variables)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import model_validator

from api.config import CommonSettings


class WorkerSettings(CommonSettings):
    """The GPU worker: Celery process settings, local work directory, and stage tuning."""

    work_dir: Path = Path("./disp-data/work")
    device: str | None = None  # None: cuda if available
    queues: str = "gpu,cpu"  # consumed when `celery worker` gets no -Q
    # threads: CUDA-safe (nothing forks) and the consumer keeps answering broker heartbeats while a stage
    # runs (the solo pool cannot, so a long stage would look dead to RabbitMQ and be redelivered).
    pool: str = "threads"
    concurrency: int = 1
    shard_size: int = 256  # records per scoring / purification shard
    cpu_workers: int = 0  # scoring/purification batches at once on CPU threads (disp.parallel); 0: one per core
    task_time_limit_s: int = 5 * 3600  # must stay below the visibility timeout
    progress_interval_s: float = 1.0
    cancel_poll_s: float = 1.0
    validation_retry_s: float = 2.0
    lease_ttl_s: float = 30.0  # a killed worker's stage is taken over this long after its last renewal
    validation_wait_s: float = 6 * 3600  # a job waits this long for its inputs' validation
    webhook_max_attempts: int = 8
    webhook_backoff_s: float = 15.0  # doubled per attempt, with jitter
    webhook_timeout_s: float = 10.0
    webhook_tolerance_s: int = 300

    @model_validator(mode="after")
    def _timeouts(self) -> WorkerSettings:
        if self.broker_url.startswith("redis") and self.task_time_limit_s >= self.visibility_timeout_s:
            raise ValueError(
                f"task_time_limit_s ({self.task_time_limit_s}) must be below visibility_timeout_s "
                f"({self.visibility_timeout_s}), else Redis redelivers a stage that is still running"
            )
        return self


@lru_cache
def get_worker_settings() -> WorkerSettings:
    return WorkerSettings()
