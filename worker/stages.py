"""Stage bodies: fetch inputs, call `disp.pipeline` with progress and cancel callbacks, put the output in
storage. A stage whose output is already in storage returns at once (redelivery, restart)."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from api.db.models import TERMINAL, Checkpoint, Dataset, Job, JobStatus
from api.db.session import session_scope
from api.storage import Storage
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


def _configs(job: Job):
    from disp.config import DefenseConfig

    return DefenseConfig.from_dict(job.settings)


def _common(ctx: StageContext) -> dict:
    return {
        "model_dir": ctx.checkpoint.model_dir,
        "projector": ctx.checkpoint.projector,
        "data_json": ctx.dataset.data_json,
        "images": ctx.dataset.images,
        "device": ctx.settings.device,
        "workers": ctx.settings.cpu_workers,
        "on_progress": ctx.reporter.on_progress,
        "should_stop": ctx.reporter.should_stop,
    }


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


def run_shard(ctx: StageContext, shard: int) -> None:
    job, stage = ctx.job, JobStatus(ctx.job.status)
    key = keys.shard(job, stage, shard)
    if ctx.storage.exists(key):
        return
    from disp import pipeline

    config = _configs(job)
    indices = shard_indices(_num_records(ctx), job.num_shards, shard)
    out = ctx.workdir / f"{stage}-shard-{shard:05d}.json"
    if stage == JobStatus.scoring:
        pipeline.score(
            out_json=out,
            config=config.saliency,
            sampler=config.purify.sampler,
            indices=indices,
            **_common(ctx),
        )
    else:
        masking = {"disp": "saliency", "no_mask": "none", "random_mask": "random"}[config.defense]
        scores = (
            _fetch(ctx, keys.merged(job, JobStatus.scoring), "scores.json") if masking == "saliency" else None
        )
        pipeline.purify(
            out_json=out,
            scores_json=scores,
            config=config.purify,
            masking=masking,
            indices=indices,
            **_common(ctx),
        )
    ctx.storage.put_file(key, out)


def merge_stage(settings: WorkerSettings, storage: Storage, job: Job, stage: JobStatus) -> None:
    """Concatenate the shard outputs in index order into the stage's merged object."""
    if storage.exists(keys.merged(job, stage)):
        return
    from disp import pipeline

    workdir = settings.work_dir / "jobs" / job.id / f"merge-{stage}"
    workdir.mkdir(parents=True, exist_ok=True)
    parts = [
        storage.download(keys.shard(job, stage, i), workdir / f"{i:05d}.json") for i in range(job.num_shards)
    ]
    merged = pipeline.merge_shards(shard_jsons=parts, out_json=workdir / "merged.json")
    storage.put_file(keys.merged(job, stage), merged)
    shutil.rmtree(workdir, ignore_errors=True)


def run_finetune(ctx: StageContext) -> None:
    job = ctx.job
    if ctx.storage.exists(keys.projector(job)):
        return
    from disp import pipeline

    config = _configs(job)
    out_dir = ctx.workdir / "finetune"
    common = _common(ctx)
    if config.defense in ("none", "pruning", "random_drop"):
        progress = common.pop("on_progress")
        del common["data_json"]
        report = pipeline.defend(
            data_json=ctx.dataset.data_json,
            out_dir=out_dir,
            config=config,
            on_progress=lambda _stage, done, total: progress(done, total),
            **common,
        )
        ctx.storage.put_file(keys.merged(job, JobStatus.purifying), out_dir / "purified.json")
        ctx.storage.put_bytes(keys.defend_report(job), json.dumps(report).encode())
        ctx.storage.put_bytes(keys.finetune_metrics(job), json.dumps(report.get("finetune") or {}).encode())
    else:
        purified = _fetch(ctx, keys.merged(job, JobStatus.purifying), "purified.json")
        del common["data_json"], common["workers"]  # fine-tuning uses torch's own threads
        pipeline.finetune(purified_json=purified, out_dir=out_dir, config=config.finetune, **common)
        ctx.storage.put_file(keys.finetune_metrics(job), out_dir / "metrics.json")
    ctx.storage.put_file(keys.projector(job), out_dir / "projector.safetensors")  # last: marks the stage done


def build_report(ctx: StageContext) -> None:
    """report.json: settings, inputs, what purification changed, fine-tuning metrics and a summary."""
    job = ctx.job
    if ctx.storage.exists(keys.report(job)):
        return
    ctx.reporter.on_progress(0, 1)
    purified = json.loads(ctx.storage.read_bytes(keys.merged(job, JobStatus.purifying)))
    finetune = json.loads(ctx.storage.read_bytes(keys.finetune_metrics(job)))
    from disp.data import answers_kept, is_text_only

    changed = [r["id"] for r in purified if not answers_kept(r)]
    num = _num_records(ctx)
    losses = finetune.get("epoch_losses") or []
    summary = {
        "num_samples": num,
        "num_train": sum(not is_text_only(r) for r in purified),
        "answers_changed": len(changed),
        "answers_changed_fraction": round(len(changed) / num, 6) if num else 0.0,
        "final_loss": losses[-1] if losses else None,
        "finetune_steps": finetune.get("steps"),
    }
    with session_scope(ctx.settings.database_url) as session:
        dataset = session.get(Dataset, job.dataset_id)
        checkpoint = session.get(Checkpoint, job.checkpoint_id)
        inputs = {
            "dataset": {"id": dataset.id, "sha256": dataset.sha256},
            "checkpoint": {"id": checkpoint.id, "sha256": checkpoint.sha256, "kind": checkpoint.kind},
        }
    report = {
        "job_id": job.id,
        "defense": job.settings.get("defense"),
        "settings": job.settings,
        "inputs": inputs,
        "summary": summary,
        "finetune": finetune,
        "changed_ids": changed[:10_000],
    }
    if ctx.storage.exists(keys.defend_report(job)):
        report["defend"] = json.loads(ctx.storage.read_bytes(keys.defend_report(job)))
    ctx.storage.put_bytes(keys.report(job), json.dumps(report, indent=2).encode())
    ctx.reporter.on_progress(1, 1)


StageBody = Callable[[StageContext], None]
