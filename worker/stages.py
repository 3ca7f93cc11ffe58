"""Runs a job's stages: fetch the stage's inputs, call `disp.defend.run_stage` with progress and cancel
callbacks, put its output and metrics in storage. A stage whose output is already in storage returns at once
(redelivery, restart)."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from api.db.models import TERMINAL, Checkpoint, Dataset, Job
from api.db.session import session_scope
from api.storage import Storage
from disp.stages import STAGES, inputs_of, plan
from worker import keys
from worker.config import WorkerSettings
from worker.inputs import CheckpointFiles, DatasetFiles, checkpoint_files, dataset_files
from worker.progress import StageReporter

log = logging.getLogger(__name__)


@dataclass
class StageContext:
    job: Job
    dataset: DatasetFiles
    checkpoint: CheckpointFiles
    workdir: Path
    reporter: StageReporter
    settings: WorkerSettings
    storage: Storage


def cancel_pending(settings: WorkerSettings, job_id: str) -> bool:
    with session_scope(settings.database_url) as session:
        job = session.get(Job, job_id)
        return job is not None and job.cancel_requested and job.status not in TERMINAL


def load_context(
    settings: WorkerSettings,
    storage: Storage,
    job_id: str,
    stage: str,
    shard: int = 0,
) -> StageContext | None:
    """The job (detached) and its local inputs, or None when the job is no longer in `stage`."""
    with session_scope(settings.database_url) as session:
        job = session.get(Job, job_id)
        if job is None or job.status != stage:
            return None
        dataset = session.get(Dataset, job.dataset_id)
        checkpoint = session.get(Checkpoint, job.checkpoint_id)
        ds = dataset_files(dataset, storage, settings)
        ck = checkpoint_files(checkpoint, storage, settings, session)
        session.expunge(job)
    workdir = settings.work_dir / "jobs" / job_id
    workdir.mkdir(parents=True, exist_ok=True)
    reporter = StageReporter(
        settings.database_url,
        job_id,
        stage,
        shard,
        interval=settings.progress_interval_s,
        poll=settings.cancel_poll_s,
    )
    return StageContext(job, ds, ck, workdir, reporter, settings, storage)


def shard_indices(num_records: int, num_shards: int, shard: int) -> list[int]:
    size = -(-num_records // num_shards)
    return list(range(shard * size, min((shard + 1) * size, num_records)))


def _num_records(ctx: StageContext) -> int:
    return len(json.loads(ctx.dataset.data_json.read_text(encoding="utf-8")))


def _fetch(ctx: StageContext, key: str, name: str) -> Path:
    path = ctx.workdir / name
    if not path.is_file():
        ctx.storage.download(key, path)
    return path


def earlier_metrics(storage: Storage, job: Job, stage: str) -> dict[str, dict]:
    """The metrics of the stages before `stage` in the job's plan (shard metrics merged)."""
    out: dict[str, dict] = {}
    for s in plan(job.settings["defense"]):
        if s.name == stage:
            break
        shards = range(job.num_shards) if s.sharded else range(1)
        out[s.name] = merge_metrics([json.loads(storage.read_bytes(keys.metrics(job, s.name, i))) for i in shards])
    return out


def merge_metrics(parts: list[dict]) -> dict:
    """One stage's metrics from its shards': counts add up."""
    if len(parts) == 1:
        return parts[0]
    return {k: sum(p.get(k, 0) for p in parts) for k in dict.fromkeys(k for p in parts for k in p)}


def output_key(job: Job, stage_name: str, shard: int) -> str:
    """Where one shard of a stage (the stage, when it is not sharded) stores its output: its 'done' mark."""
    stage = STAGES[stage_name]
    return keys.shard(job, stage.name, shard) if stage.sharded else keys.output(job, stage.writes)


def run(ctx: StageContext, shard: int) -> None:
    """Run the job's current stage (one shard of it) and store its output and metrics; a stage whose output
    is already stored returns at once."""
    job = ctx.job
    stage = STAGES[job.status]
    key = output_key(job, stage.name, shard)
    if ctx.storage.exists(key):
        return
    from disp.config import DefenseConfig
    from disp.defend import run_stage

    config = DefenseConfig.from_dict(job.settings)
    files = {f: _fetch(ctx, keys.output(job, f), f) for f in inputs_of(stage, config.defense)}
    out = ctx.workdir / (f"{stage.name}-shard-{shard:05d}.json" if stage.sharded else stage.writes)
    metrics = run_stage(
        stage.name,
        model_dir=ctx.checkpoint.model_dir,
        projector=ctx.checkpoint.projector,
        data_json=ctx.dataset.data_json,
        images=ctx.dataset.images,
        out=out,
        config=config,
        files=files,
        metrics=earlier_metrics(ctx.storage, job, stage.name),
        indices=shard_indices(_num_records(ctx), job.num_shards, shard) if stage.sharded else None,
        run_key=f"{job.id}-{stage.name}",
        device=ctx.settings.device,
        workers=ctx.settings.cpu_workers,
        on_progress=ctx.reporter.on_progress,
        should_stop=ctx.reporter.should_stop,
    )
    ctx.storage.put_bytes(keys.metrics(job, stage.name, shard), json.dumps(metrics).encode())
    if stage.name == "evaluating":
        _add_job_details(ctx, out)
    ctx.storage.put_file(key, out)  # last: marks the stage (shard) done


def _add_job_details(ctx: StageContext, report_path: Path) -> None:
    """The report names the job and the stored inputs it ran on."""
    job = ctx.job
    with session_scope(ctx.settings.database_url) as session:
        dataset = session.get(Dataset, job.dataset_id)
        checkpoint = session.get(Checkpoint, job.checkpoint_id)
        inputs = {
            "dataset": {"id": dataset.id, "sha256": dataset.sha256},
            "checkpoint": {"id": checkpoint.id, "sha256": checkpoint.sha256, "kind": checkpoint.kind},
        }
    report = json.loads(report_path.read_text())
    report_path.write_text(json.dumps({"job_id": job.id, "inputs": inputs, **report}, indent=2))


def merge_stage(settings: WorkerSettings, storage: Storage, job: Job, stage: str) -> None:
    """Concatenate the shard outputs in index order into the stage's output."""
    key = keys.output(job, STAGES[stage].writes)
    if storage.exists(key):
        return
    from disp.pipeline import merge_shards

    workdir = settings.work_dir / "jobs" / job.id / f"merge-{stage}"
    workdir.mkdir(parents=True, exist_ok=True)
    parts = [
        storage.download(keys.shard(job, stage, i), workdir / f"{i:05d}.json") for i in range(job.num_shards)
    ]
    merged = merge_shards(shard_jsons=parts, out_json=workdir / "merged.json")
    storage.put_file(key, merged)
    shutil.rmtree(workdir, ignore_errors=True)
