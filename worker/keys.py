"""Storage keys of a job's stage outputs: each finished stage is objects under the job's prefix."""

from __future__ import annotations

from pathlib import PurePosixPath

from api.db.models import Job
from api.services.files import object_prefix
from disp.stages import PROJECTOR_FILE, PURIFIED_FILE, REPORT_FILE, SALIENCY_FILE, STAGES

# what a succeeded job publishes: (artifact kind, stage output file)
PUBLISHED = (("projector", PROJECTOR_FILE), ("purified_dataset", PURIFIED_FILE), ("saliency", SALIENCY_FILE),
             ("report", REPORT_FILE))


def prefix(job: Job) -> str:
    return object_prefix(job.tenant_id, "jobs", job.id)


def output(job: Job, name: str) -> str:
    """A stage's output file (merged over shards for a sharded stage)."""
    return f"{prefix(job)}/{name}"


def shard(job: Job, stage: str, index: int) -> str:
    return f"{prefix(job)}/{PurePosixPath(STAGES[stage].writes).stem}/shard-{index:05d}.json"


def metrics(job: Job, stage: str, index: int = 0) -> str:
    """A stage's metrics (per shard for a sharded stage)."""
    return f"{prefix(job)}/metrics/{stage}-{index:05d}.json"


def artifacts(job: Job) -> list[tuple[str, str, str]]:
    """(kind, key, download filename) of every artifact a succeeded job may publish (those its plan wrote)."""
    return [(kind, output(job, name), name) for kind, name in PUBLISHED]
