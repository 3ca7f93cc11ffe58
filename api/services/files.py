"""Datasets, checkpoints, base models and presigned multipart uploads."""

from __future__ import annotations

import math
from datetime import timedelta
from pathlib import Path

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from api.archive import ArchiveError
from api.config import ApiSettings, CommonSettings
from api.db.models import (
    TERMINAL,
    BaseModelEntry,
    Checkpoint,
    Dataset,
    Job,
    Upload,
    UploadStatus,
    new_id,
    utcnow,
)
from api.errors import ApiError, not_found, public_message
from api.ingest import precheck_checkpoint, precheck_dataset
from api.schemas import checkpoint_kind
from api.storage import Storage, StorageError

MAX_PARTS = 10_000


def _safe_filename(name: str) -> str:
    base = Path(name.replace("\\", "/")).name.strip() or "upload"
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in base)[:200]


def object_prefix(tenant_id: str, kind: str, object_id: str) -> str:
    """Where a tenant's object lives in storage: `tenants/<tenant>/<datasets|checkpoints|jobs>/<id>`."""
    return f"tenants/{tenant_id}/{kind}/{object_id}"


def object_key(tenant_id: str, kind: str, object_id: str, filename: str) -> str:
    return f"{object_prefix(tenant_id, kind, object_id)}/{_safe_filename(filename)}"


TOO_LARGE = {
    "archive_too_large",
    "compression_ratio_too_high",
    "dataset_json_too_large",
    "member_too_large",
    "too_many_entries",
    "too_many_records",
}


def archive_error(exc: ArchiveError, param: str = "file") -> ApiError:
    """415 for pickles, 413 for an upload over a size or count limit (the message names it), else 422."""
    status = 415 if exc.code == "pickle_refused" else 413 if exc.code in TOO_LARGE else 422
    return ApiError(status, exc.code, public_message(str(exc)), param)


def find_base_model(*, session: Session, ref: str) -> BaseModelEntry | None:
    return session.execute(
        select(BaseModelEntry).where(or_(BaseModelEntry.id == ref, BaseModelEntry.name == ref))
    ).scalar_one_or_none()


def create_dataset(
    *,
    session: Session,
    settings: ApiSettings,
    storage: Storage,
    tenant_id: str,
    path: Path,
    filename: str,
    name: str | None,
    sha256: str,
) -> Dataset:
    """Pre-check an uploaded archive, store it, and add a `validating` dataset row."""
    try:
        summary = precheck_dataset(path, settings, filename)
    except ArchiveError as exc:
        raise archive_error(exc) from None
    dataset_id = new_id("ds")
    key = object_key(tenant_id, "datasets", dataset_id, filename)
    storage.put_file(key, path)
    row = Dataset(
        id=dataset_id,
        tenant_id=tenant_id,
        name=name or filename,
        archive_format=summary.archive_format,
        storage_key=key,
        bytes=path.stat().st_size,
        sha256=sha256,
        num_records=summary.num_records,
    )
    session.add(row)
    return row


def resolve_checkpoint_kind(*, session: Session, kind: str, base_model: str | None) -> str | None:
    """The id of the base model a kind=projector checkpoint is laid over (None for a full one)."""
    if checkpoint_kind(kind) == "projector":
        if not base_model:
            raise ApiError(422, "invalid_request", "a projector checkpoint needs base_model", "base_model")
        entry = find_base_model(session=session, ref=base_model)
        if entry is None:
            raise not_found("model", base_model, "base_model")
        return entry.id
    if base_model:
        raise ApiError(422, "invalid_request", "base_model applies only to kind=projector", "base_model")
    return None


def create_checkpoint(
    *,
    session: Session,
    settings: ApiSettings,
    storage: Storage,
    tenant_id: str,
    path: Path,
    filename: str,
    name: str | None,
    kind: str,
    base_model: str | None,
    sha256: str,
) -> Checkpoint:
    kind = checkpoint_kind(kind)
    base_model_id = resolve_checkpoint_kind(session=session, kind=kind, base_model=base_model)
    try:
        summary = precheck_checkpoint(path, filename, kind, settings)
    except ArchiveError as exc:
        raise archive_error(exc) from None
    checkpoint_id = new_id("ckpt")
    key = object_key(tenant_id, "checkpoints", checkpoint_id, filename)
    storage.put_file(key, path)
    row = Checkpoint(
        id=checkpoint_id,
        tenant_id=tenant_id,
        name=name or filename,
        kind=kind,
        base_model_id=base_model_id,
        archive_format=summary.archive_format,
        storage_key=key,
        bytes=path.stat().st_size,
        sha256=sha256,
    )
    session.add(row)
    return row


def create_upload(
    *,
    session: Session,
    settings: ApiSettings,
    storage: Storage,
    tenant_id: str,
    purpose: str,
    filename: str,
    size: int,
    sha256: str,
    options: dict,
    part_size: int | None,
) -> Upload:
    from api.archive import refuse_pickle_name

    if purpose == "checkpoint":
        try:
            refuse_pickle_name(filename)
        except ArchiveError as exc:
            raise archive_error(exc, "filename") from None
        options["kind"] = checkpoint_kind(options.get("kind", "full"))
        options["base_model_id"] = resolve_checkpoint_kind(
            session=session, kind=options["kind"], base_model=options.get("base_model")
        )
    if size > settings.max_archive_bytes:
        raise ApiError(
            413,
            "upload_too_large",
            f"{size} bytes is above the limit of {settings.max_archive_bytes}",
            "bytes",
        )
    part = part_size or max(settings.part_size_bytes, math.ceil(size / MAX_PARTS))
    if part < settings.min_part_size_bytes and part < size:
        raise ApiError(
            422, "invalid_request", f"part_size must be >= {settings.min_part_size_bytes}", "part_size"
        )
    upload_id = new_id("upl")
    kind = "datasets" if purpose == "dataset" else "checkpoints"
    key = object_key(tenant_id, kind, upload_id, filename)
    row = Upload(
        id=upload_id,
        tenant_id=tenant_id,
        purpose=purpose,
        filename=filename,
        bytes=size,
        sha256=sha256,
        part_size=part,
        storage_key=key,
        storage_upload_id=storage.create_multipart(key),
        options=options,
        expires_at=utcnow() + timedelta(seconds=settings.upload_expiry_s),
    )
    session.add(row)
    return row


def num_parts(upload: Upload) -> int:
    return max(1, math.ceil(upload.bytes / upload.part_size))


def require_open(upload: Upload) -> None:
    from api.db.models import as_utc

    if upload.status != UploadStatus.pending:
        raise ApiError(409, "upload_not_open", f"upload {upload.id} is {upload.status}")
    if as_utc(upload.expires_at) < utcnow():
        raise ApiError(
            409, "upload_expired", f"upload {upload.id} expired at {upload.expires_at.isoformat()}"
        )


def complete_upload(
    *, session: Session, storage: Storage, upload: Upload, parts: list[tuple[int, str]]
) -> str:
    """Assemble the parts, check the byte count, and create the dataset or checkpoint row (`validating`);
    the worker checks the SHA-256 and the contents. Returns the new object's id."""
    require_open(upload)
    numbers = [n for n, _ in parts]
    if numbers != sorted(set(numbers)) or numbers != list(range(1, num_parts(upload) + 1)):
        raise ApiError(
            422, "invalid_parts", f"expected parts 1..{num_parts(upload)} in order, got {numbers}", "parts"
        )
    try:
        storage.complete_multipart(upload.storage_key, upload.storage_upload_id, parts)
    except StorageError as exc:
        raise ApiError(422, "invalid_parts", str(exc), "parts") from None
    size = storage.size(upload.storage_key)
    if size != upload.bytes:
        storage.delete(upload.storage_key)
        upload.status = UploadStatus.invalid
        raise ApiError(422, "size_mismatch", f"uploaded {size} bytes, declared {upload.bytes}", "bytes")
    opts = upload.options or {}
    name = opts.get("name") or upload.filename
    if upload.purpose == "dataset":
        row = Dataset(
            tenant_id=upload.tenant_id,
            name=name,
            archive_format="pending",
            storage_key=upload.storage_key,
            bytes=size,
            sha256=upload.sha256,
        )
    else:
        row = Checkpoint(
            tenant_id=upload.tenant_id,
            name=name,
            kind=checkpoint_kind(opts.get("kind", "full")),
            base_model_id=opts.get("base_model_id"),
            archive_format="pending",
            storage_key=upload.storage_key,
            bytes=size,
            sha256=upload.sha256,
        )
    session.add(row)
    session.flush()
    upload.status, upload.object_id = UploadStatus.ready, row.id
    return row.id


def abort_upload(*, storage: Storage, upload: Upload) -> None:
    if upload.status == UploadStatus.pending:
        storage.abort_multipart(upload.storage_key, upload.storage_upload_id)
        upload.status = UploadStatus.aborted


def delete_input(*, session: Session, storage: Storage, row: Dataset | Checkpoint) -> None:
    """Delete a dataset's or checkpoint's stored object and mark the row `deleted` (it stays, hidden, for the
    jobs that ran on it). Refused with 409 while an unfinished job uses it; the row lock taken here is the one
    job creation takes, so no job can start on it meanwhile."""
    kind = "dataset" if isinstance(row, Dataset) else "checkpoint"
    column = Job.dataset_id if isinstance(row, Dataset) else Job.checkpoint_id
    session.refresh(row, with_for_update=True)
    busy = session.scalars(
        select(Job.id).where(column == row.id, Job.status.not_in(list(TERMINAL))).order_by(Job.id).limit(5)
    ).all()
    if busy:
        raise ApiError(
            409,
            f"{kind}_in_use",
            f"{kind} {row.id} is used by unfinished job(s) {', '.join(busy)}; cancel them or wait until they end",
        )
    storage.delete(row.storage_key)  # first: a failed commit leaves a retry that deletes again
    row.status, row.error = UploadStatus.deleted, None


def register_base_model(
    *, session: Session, storage: Storage, settings: CommonSettings, name: str, checkpoint_dir: Path
) -> BaseModelEntry:
    """Admin: tar a checkpoint dir into storage, listed under `/v1/models` (replaces a same-named one)."""
    import tarfile
    import tempfile

    from api.archive import refuse_pickle_name
    from api.ingest import precheck_checkpoint
    from api.storage import file_sha256

    for f in checkpoint_dir.rglob("*"):
        if f.is_file():
            try:
                refuse_pickle_name(f.name)
            except ArchiveError as exc:
                raise ValueError(str(exc)) from None
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "model.tar"
        with tarfile.open(archive, "w") as tf:
            for f in sorted(checkpoint_dir.rglob("*")):
                if f.is_file():
                    tf.add(f, arcname=str(f.relative_to(checkpoint_dir)))
        try:
            precheck_checkpoint(archive, "model.tar", "full", settings)
        except ArchiveError as exc:
            raise ValueError(str(exc)) from None
        entry = find_base_model(session=session, ref=name) or BaseModelEntry(
            name=name, storage_key="", sha256="", bytes=0
        )
        session.add(entry)
        session.flush()
        entry.storage_key = f"models/{entry.id}/model.tar"
        storage.put_file(entry.storage_key, archive)
        entry.sha256, entry.bytes = file_sha256(archive), archive.stat().st_size
    return entry
