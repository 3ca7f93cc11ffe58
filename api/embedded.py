"""The embedded default behind `disp serve`: the API plus one worker on this machine, with SQLite, local
files and Celery's filesystem broker (no server needed). Everything lives under one data directory."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def embedded_env(data_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000) -> dict[str, str]:
    """DISP_* variables of the embedded deployment (the secret key is created once and kept)."""
    data = Path(data_dir).resolve()
    broker = data / "broker"
    for sub in (broker / "queue", broker / "processed", broker / "control", data / "storage", data / "work"):
        sub.mkdir(parents=True, exist_ok=True)
    secret_file = data / "secret_key"
    if not secret_file.exists():
        secret_file.write_text(secrets.token_urlsafe(32))
        secret_file.chmod(0o600)
    transport = {
        "data_folder_in": str(broker / "queue"),
        "data_folder_out": str(broker / "queue"),
        "processed_folder": str(broker / "processed"),
        "control_folder": str(broker / "control"),
        "store_processed": False,
    }
    return {
        "DISP_ENVIRONMENT": "development",
        "DISP_SECRET_KEY": secret_file.read_text().strip(),
        "DISP_DATABASE_URL": f"sqlite:///{data / 'disp.db'}",
        "DISP_BROKER_URL": "filesystem://",
        "DISP_BROKER_TRANSPORT_OPTIONS": json.dumps(transport),
        "DISP_RESULT_BACKEND": f"db+sqlite:///{data / 'results.db'}",
        "DISP_STORAGE_BACKEND": "local",
        "DISP_STORAGE_ROOT": str(data / "storage"),
        "DISP_WORK_DIR": str(data / "work"),
        "DISP_PUBLIC_URL": f"http://{host}:{port}",
        "DISP_WEBHOOK_ALLOW_PRIVATE": "true",
        "DISP_RATE_LIMIT_REDIS_URL": "",  # one user, no Redis: no per-tenant rate limits
        "DISP_VALIDATION_RETRY_S": "0.5",
        "DISP_PROGRESS_INTERVAL_S": "0.5",
        "DISP_CANCEL_POLL_S": "0.5",
    }


def apply_env(env: dict[str, str]) -> None:
    os.environ.update(env)
    from api.config import get_settings

    get_settings.cache_clear()


def start_worker(env: dict[str, str], log_path: Path | None = None) -> subprocess.Popen:
    """One Celery worker (solo pool, both queues) as a child process."""
    cmd = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.celery_app",
        "worker",
        "-P",
        "solo",
        "-c",
        "1",
        "--loglevel",
        "INFO",
        "-n",
        "embedded@%h",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    # From a source tree the child needs the tree on its path; an installed package is found anyway.
    child_env = {
        **os.environ,
        **env,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    data_dir = Path(env["DISP_STORAGE_ROOT"]).parent
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 (the child owns it)
    return subprocess.Popen(
        cmd,
        cwd=data_dir,
        env=child_env,
        stdout=out,
        stderr=subprocess.STDOUT,
        preexec_fn=_die_with_parent if sys.platform == "linux" else None,
    )


def _die_with_parent() -> None:
    """uvicorn re-raises SIGTERM after its shutdown, so `finally` may not run: the kernel stops the worker."""
    import ctypes
    import signal

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def resume_unfinished(settings) -> int:
    """The filesystem broker forgets a message once a worker takes it: after a restart, re-send the work
    of every unfinished upload and job (tasks are idempotent; finished stages are skipped)."""
    from sqlalchemy import select

    from api.db.models import TERMINAL, Checkpoint, Dataset, Job, JobStatus, UploadStatus
    from api.db.session import session_scope
    from api.queue import ADVANCE_JOB, VALIDATE_CHECKPOINT, VALIDATE_DATASET, VALIDATE_JOB, enqueue

    with session_scope(settings.database_url) as session:
        datasets = session.scalars(select(Dataset.id).where(Dataset.status == UploadStatus.validating)).all()
        checkpoints = session.scalars(
            select(Checkpoint.id).where(Checkpoint.status == UploadStatus.validating)
        ).all()
        jobs = session.execute(select(Job.id, Job.status).where(Job.status.not_in(list(TERMINAL)))).all()
    for dataset_id in datasets:
        enqueue(settings, VALIDATE_DATASET, dataset_id=dataset_id)
    for checkpoint_id in checkpoints:
        enqueue(settings, VALIDATE_CHECKPOINT, checkpoint_id=checkpoint_id)
    for job_id, status in jobs:
        if status == JobStatus.validating:
            enqueue(settings, VALIDATE_JOB, job_id=job_id)
        else:
            enqueue(settings, ADVANCE_JOB, job_id=job_id, resume=True)
    return len(datasets) + len(checkpoints) + len(jobs)


def serve(
    data_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    worker: bool = True,
    log_level: str = "info",
) -> None:
    """Run migrations, start the worker, then the API in this process until interrupted."""
    import uvicorn

    env = embedded_env(data_dir, host=host, port=port)
    apply_env(env)
    from api.config import get_settings
    from api.main import create_app
    from api.migrate import upgrade

    settings = get_settings()
    upgrade(settings.database_url)
    resume_unfinished(settings)
    child = start_worker(env, Path(data_dir) / "worker.log") if worker else None
    try:
        uvicorn.run(create_app(settings), host=host, port=port, log_level=log_level)
    finally:
        if child is not None:
            child.terminate()
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                child.kill()
