"""Storage keys of a job's stage outputs: each finished stage is objects under the job's prefix."""

from __future__ import annotations

from api.db.models import Job, JobStatus
from api.services.files import object_prefix

_DIR = {JobStatus.scoring: "scores", JobStatus.purifying: "purified"}


def prefix(job: Job) -> str:
    return object_prefix(job.tenant_id, "jobs", job.id)


def shard(job: Job, stage: str, index: int) -> str:
    return f"{prefix(job)}/{_DIR[JobStatus(stage)]}/shard-{index:05d}.json"


def merged(job: Job, stage: str) -> str:
    return f"{prefix(job)}/{_DIR[JobStatus(stage)]}.json"


def projector(job: Job) -> str:
    return f"{prefix(job)}/projector.safetensors"


def finetune_metrics(job: Job) -> str:
    return f"{prefix(job)}/finetune_metrics.json"


def defend_report(job: Job) -> str:
    return f"{prefix(job)}/defend_report.json"


def report(job: Job) -> str:
    return f"{prefix(job)}/report.json"


def artifacts(job: Job) -> list[tuple[str, str, str]]:
    """(kind, key, download filename) of every artifact a succeeded job publishes."""
    return [
        ("projector", projector(job), "projector.safetensors"),
        ("purified_dataset", merged(job, JobStatus.purifying), "purified.json"),
        ("report", report(job), "report.json"),
    ]
