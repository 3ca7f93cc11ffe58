"""Checkpoints: a full checkpoint directory as an archive, or a projector laid over a registered base model.
Safetensors only: pickles are refused unopened."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Response, UploadFile
from sqlalchemy import select

from api.archive import ArchiveError, refuse_pickle_name
from api.db.models import Checkpoint, UploadStatus
from api.deps import CurrentCheckpoint, IdempotencyKey, SessionDep, SettingsDep, StorageDep, TenantDep
from api.errors import responses
from api.queue import VALIDATE_CHECKPOINT
from api.routes.common import After, FormName, Limit, TempDir, send, spool, upload_filename
from api.schemas import CHECKPOINT_KIND_HELP, MODEL_REF_PATTERN, CheckpointKind, CheckpointList, CheckpointOut
from api.services import files

router = APIRouter(prefix="/checkpoints", tags=["checkpoints"])


@router.post(
    "",
    status_code=201,
    response_model=CheckpointOut,
    dependencies=[IdempotencyKey],
    responses=responses(400, 401, 404, 409, 413, 415, 422, 503),
)
def create_checkpoint(
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    tenant: TenantDep,
    file: Annotated[UploadFile, File(description="zip/tar of a checkpoint dir, or a projector .safetensors")],
    kind: Annotated[CheckpointKind, Form(description=CHECKPOINT_KIND_HELP)] = "full",
    base_model: Annotated[
        str | None, Form(pattern=MODEL_REF_PATTERN, description="base model id or name (kind=projector)")
    ] = None,
    name: FormName = None,
) -> Checkpoint:
    filename = upload_filename(file, "checkpoint")
    try:
        refuse_pickle_name(filename)  # before a single byte of the file is looked at
    except ArchiveError as exc:
        raise files.archive_error(exc) from None
    with TempDir() as tmp:
        path, sha256 = spool(file, tmp)
        row = files.create_checkpoint(
            session=session,
            settings=settings,
            storage=storage,
            tenant_id=tenant.id,
            path=path,
            filename=filename,
            name=name,
            kind=kind,
            base_model=base_model,
            sha256=sha256,
        )
        session.commit()
    send(settings, VALIDATE_CHECKPOINT, checkpoint_id=row.id)
    return row


@router.get("", response_model=CheckpointList, responses=responses(401, 422))
def list_checkpoints(session: SessionDep, tenant: TenantDep, limit: Limit = 20, after: After = None) -> dict:
    query = (
        select(Checkpoint)
        .where(Checkpoint.tenant_id == tenant.id, Checkpoint.status != UploadStatus.deleted)
        .order_by(Checkpoint.id.desc())
    )
    if after:
        query = query.where(Checkpoint.id < after)
    rows = list(session.scalars(query.limit(limit + 1)))
    data = [CheckpointOut.model_validate(r, from_attributes=True) for r in rows[:limit]]
    return {
        "data": data,
        "has_more": len(rows) > limit,
        "next_cursor": data[-1].id if len(rows) > limit else None,
    }


@router.get("/{checkpoint_id}", response_model=CheckpointOut, responses=responses(401, 404, 422))
def get_checkpoint(checkpoint: CurrentCheckpoint) -> Checkpoint:
    return checkpoint


@router.delete(
    "/{checkpoint_id}", status_code=204, response_class=Response, responses=responses(401, 404, 409, 422, 503)
)
def delete_checkpoint(checkpoint: CurrentCheckpoint, session: SessionDep, storage: StorageDep) -> Response:
    """Delete the checkpoint and its stored archive; refused (409) while an unfinished job uses it."""
    files.delete_input(session=session, storage=storage, row=checkpoint)
    session.commit()
    return Response(status_code=204)
