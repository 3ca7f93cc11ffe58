"""Checkpoints: a full checkpoint directory as an archive, or a projector-only adapter over a base model.
Safetensors only: pickles are refused unopened."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, UploadFile
from sqlalchemy import select

from api.archive import ArchiveError, refuse_pickle_name
from api.db.models import Checkpoint
from api.deps import CurrentCheckpoint, SessionDep, SettingsDep, StorageDep, TenantDep
from api.queue import VALIDATE_CHECKPOINT
from api.routes.common import After, Limit, TempDir, send, spool
from api.schemas import CheckpointList, CheckpointOut
from api.services import files

router = APIRouter(prefix="/checkpoints", tags=["checkpoints"])


@router.post("", status_code=201, response_model=CheckpointOut)
def create_checkpoint(
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    tenant: TenantDep,
    file: Annotated[UploadFile, File(description="zip/tar of a checkpoint dir, or a projector .safetensors")],
    kind: Annotated[Literal["full", "adapter"], Form()] = "full",
    base_model: Annotated[str | None, Form(description="base model id or name (adapters)")] = None,
    name: Annotated[str | None, Form()] = None,
) -> Checkpoint:
    filename = file.filename or "checkpoint"
    try:
        refuse_pickle_name(filename)  # before a single byte of the file is looked at
    except ArchiveError as exc:
        raise files.archive_error(exc) from None
    with TempDir() as tmp:
        path, sha256 = spool(file, tmp)
        row = files.create_checkpoint(
            session=session,
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


@router.get("", response_model=CheckpointList)
def list_checkpoints(session: SessionDep, tenant: TenantDep, limit: Limit = 20, after: After = None) -> dict:
    query = select(Checkpoint).where(Checkpoint.tenant_id == tenant.id).order_by(Checkpoint.id.desc())
    if after:
        query = query.where(Checkpoint.id < after)
    rows = list(session.scalars(query.limit(limit + 1)))
    data = [CheckpointOut.model_validate(r, from_attributes=True) for r in rows[:limit]]
    return {
        "data": data,
        "has_more": len(rows) > limit,
        "next_cursor": data[-1].id if len(rows) > limit else None,
    }


@router.get("/{checkpoint_id}", response_model=CheckpointOut)
def get_checkpoint(checkpoint: CurrentCheckpoint) -> Checkpoint:
    return checkpoint
