"""Helpers shared by routers: upload spooling, enqueue-after-commit, pagination parameters."""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Annotated

from fastapi import Form, Query, UploadFile

from api.config import CommonSettings
from api.errors import ApiError
from api.queue import DELIVER_WEBHOOK, enqueue
from api.schemas import ID_PATTERN, NO_NUL

log = logging.getLogger(__name__)

Limit = Annotated[int, Query(ge=1, le=100, description="Page size.")]
After = Annotated[
    str | None, Query(pattern=ID_PATTERN, description="Cursor: the last id of the previous page.")
]
FormName = Annotated[str | None, Form(min_length=1, max_length=300, pattern=NO_NUL)]


def upload_filename(upload: UploadFile, default: str) -> str:
    """The client's file name as a display name: its last path component, control characters replaced,
    at most 300 characters."""
    raw = (upload.filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c if c.isprintable() else "_" for c in raw).strip()[:300]
    return name or default


def spool(upload: UploadFile, dest_dir: Path) -> tuple[Path, str]:
    """Copy an uploaded file to `dest_dir`, returning its path and SHA-256."""
    digest = hashlib.sha256()
    path = dest_dir / "upload"
    upload.file.seek(0)
    with open(path, "wb") as out:
        while chunk := upload.file.read(1024 * 1024):
            digest.update(chunk)
            out.write(chunk)
    return path, digest.hexdigest()


class TempDir:
    def __enter__(self) -> Path:
        self.path = Path(tempfile.mkdtemp(prefix="disp-upload-"))
        return self.path

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def send(settings: CommonSettings, task: str, **kwargs: str) -> None:
    """Enqueue after the commit. If the broker is down, the row just created is failed (so a client's
    retry, which gets a fresh object, leaves nothing pending forever) and the caller gets a 503."""
    try:
        enqueue(settings, task, **kwargs)
    except Exception:  # kombu raises OperationalError and friends; their text may hold the broker's URL
        log.exception("enqueue %s failed", task)
        message = "the job queue is unavailable; retry later"
        _fail_unqueued(settings, task, kwargs, message)
        raise ApiError(503, "broker_unavailable", message) from None


def _fail_unqueued(settings: CommonSettings, task: str, kwargs: dict, message: str) -> None:
    from api import jobstate
    from api.db.models import Checkpoint, Dataset, JobStatus, UploadStatus
    from api.db.session import session_scope
    from api.queue import VALIDATE_JOB

    error = {"code": "broker_unavailable", "message": message[:500]}
    with session_scope(settings.database_url) as session:
        if task == VALIDATE_JOB:
            jobstate.transition(
                session, kwargs["job_id"], JobStatus.failed, expect=JobStatus.validating, error=error
            )
            return
        row = session.get(Dataset, kwargs["dataset_id"]) if "dataset_id" in kwargs else None
        row = row or session.get(Checkpoint, kwargs.get("checkpoint_id", ""))
        if row is not None and row.status == UploadStatus.validating:
            row.status, row.error = UploadStatus.invalid, error


def send_webhook(settings: CommonSettings, delivery_id: str | None) -> None:
    if delivery_id:
        try:
            enqueue(settings, DELIVER_WEBHOOK, delivery_id=delivery_id)
        except Exception:
            log.exception("could not enqueue webhook %s", delivery_id)
