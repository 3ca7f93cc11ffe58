"""FastAPI dependencies as `Annotated` aliases: settings, DB session, tenant, storage, current objects.

No `from __future__ import annotations` here: FastAPI reads these annotations at runtime."""

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.config import ApiSettings
from api.db.models import ApiKey, Artifact, Checkpoint, Dataset, Job, Tenant, Upload
from api.db.session import get_reader, get_sessionmaker
from api.errors import ApiError, not_found
from api.limits import check_rate
from api.schemas import ID_PATTERN
from api.security import hash_api_key
from api.storage import Storage, get_storage


def get_settings_dep(request: Request) -> ApiSettings:
    return request.app.state.settings


SettingsDep = Annotated[ApiSettings, Depends(get_settings_dep)]


def get_session(request: Request, settings: SettingsDep) -> Iterator[Session]:
    """A session per request; GETs only read, so theirs runs without a transaction (fewer round trips)."""
    maker = get_reader if request.method in ("GET", "HEAD") else get_sessionmaker
    session = maker(settings.database_url)()
    try:
        yield session
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(get_session)]


def storage_dep(settings: SettingsDep) -> Storage:
    return get_storage(settings)


StorageDep = Annotated[Storage, Depends(storage_dep)]


def bearer_key(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def tenant_for_key(session: Session, key: str | None) -> Tenant | None:
    """The tenant owning an unrevoked API key, else None."""
    if not key:
        return None
    row = session.execute(
        select(Tenant)
        .join(ApiKey, ApiKey.tenant_id == Tenant.id)
        .where(ApiKey.key_hash == hash_api_key(key), ApiKey.revoked_at.is_(None))
    ).scalar_one_or_none()
    return row


bearer_scheme = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer dsk_...`.")
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)]


def current_tenant(session: SessionDep, settings: SettingsDep, credentials: BearerDep) -> Tenant:
    """The caller's tenant, counted against its request rate limit (429 when exhausted)."""
    tenant = tenant_for_key(session, credentials.credentials if credentials else None)
    if tenant is None:
        raise ApiError(
            401, "unauthorized", "Missing, invalid or revoked API key (use 'Authorization: Bearer ...')"
        )
    check_rate(settings, tenant.id)
    return tenant


TenantDep = Annotated[Tenant, Depends(current_tenant)]


def _owned(model, kind: str, param: str):
    def load(
        session: SessionDep,
        tenant: TenantDep,
        object_id: Annotated[str, Path(alias=param, pattern=ID_PATTERN)],
    ):
        row = session.get(model, object_id)
        # another tenant's id, or a deleted object, is indistinguishable from none
        if row is None or row.tenant_id != tenant.id or getattr(row, "status", None) == "deleted":
            raise not_found(kind, object_id, param)
        return row

    return load


IDEMPOTENCY_KEY_PATTERN = r"^[\x21-\x7e]{1,255}$"


def idempotency_key(
    key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            pattern=IDEMPOTENCY_KEY_PATTERN,
            description="Retry-safe POST: the first response (below 500) under this key is stored for 24 h and "
            "replayed (`Idempotent-Replayed: true`) for a retry with the same request; another request under the "
            "same key gets 422 `idempotency_key_reused`, one still in progress 409 `idempotency_key_in_use`. "
            "Printable ASCII, at most 255 characters.",
        ),
    ] = None,
) -> None:
    """Documents the header; the `Idempotency` middleware acts on it before the route runs."""


IdempotencyKey = Depends(idempotency_key)


CurrentJob = Annotated[Job, Depends(_owned(Job, "job", "job_id"))]
CurrentDataset = Annotated[Dataset, Depends(_owned(Dataset, "dataset", "dataset_id"))]
CurrentCheckpoint = Annotated[Checkpoint, Depends(_owned(Checkpoint, "checkpoint", "checkpoint_id"))]
CurrentUpload = Annotated[Upload, Depends(_owned(Upload, "upload", "upload_id"))]
CurrentArtifact = Annotated[Artifact, Depends(_owned(Artifact, "artifact", "artifact_id"))]
