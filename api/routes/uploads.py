"""Presigned multipart uploads straight to storage: create, part URLs, complete (ETags + SHA-256), abort.

With the local-files backend the part URLs point back at this API (`PUT .../parts/{n}?token=`)."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response

from api.db.models import Upload, as_utc, utcnow
from api.deps import CurrentUpload, IdempotencyKey, SessionDep, SettingsDep, StorageDep, TenantDep
from api.errors import ApiError, not_found, responses
from api.queue import VALIDATE_CHECKPOINT, VALIDATE_DATASET
from api.routes.common import send
from api.schemas import (
    ID_PATTERN,
    PartsRequest,
    PartUrl,
    PartUrls,
    UploadComplete,
    UploadCreate,
    UploadOut,
)
from api.security import check_url_token, sign_url_token
from api.services import files

router = APIRouter(prefix="/uploads", tags=["uploads"])


def _out(upload: Upload) -> UploadOut:
    return UploadOut(
        id=upload.id,
        purpose=upload.purpose,
        filename=upload.filename,
        bytes=upload.bytes,
        part_size=upload.part_size,
        num_parts=files.num_parts(upload),
        status=upload.status,
        object_id=upload.object_id,
        expires_at=upload.expires_at,
        created_at=upload.created_at,
    )


@router.post(
    "",
    status_code=201,
    response_model=UploadOut,
    dependencies=[IdempotencyKey],
    responses=responses(400, 401, 404, 409, 413, 415, 422, 503),
)
def create_upload(
    body: UploadCreate, session: SessionDep, settings: SettingsDep, storage: StorageDep, tenant: TenantDep
) -> UploadOut:
    options = {"name": body.name, "kind": body.kind, "base_model": body.base_model}
    upload = files.create_upload(
        session=session,
        settings=settings,
        storage=storage,
        tenant_id=tenant.id,
        purpose=body.purpose,
        filename=body.filename,
        size=body.bytes,
        sha256=body.sha256,
        options=options,
        part_size=body.part_size,
    )
    session.commit()
    return _out(upload)


@router.get("/{upload_id}", response_model=UploadOut, responses=responses(401, 404, 422))
def get_upload(upload: CurrentUpload) -> UploadOut:
    return _out(upload)


@router.post(
    "/{upload_id}/parts",
    response_model=PartUrls,
    dependencies=[IdempotencyKey],
    responses=responses(400, 401, 404, 409, 413, 422),
)
def part_urls(
    upload: CurrentUpload, settings: SettingsDep, storage: StorageDep, body: PartsRequest | None = None
) -> PartUrls:
    """Presigned PUT URLs for the requested parts (each returns an ETag to pass to complete)."""
    files.require_open(upload)
    count = files.num_parts(upload)
    numbers = (body.part_numbers if body and body.part_numbers else None) or list(range(1, count + 1))
    if any(not 1 <= n <= count for n in numbers):
        raise ApiError(422, "invalid_parts", f"part numbers must be in 1..{count}", "part_numbers")
    expires = min(
        settings.presign_expiry_s, max(1, int((as_utc(upload.expires_at) - utcnow()).total_seconds()))
    )
    urls = []
    for n in numbers:
        url = storage.presign_part(upload.storage_key, upload.storage_upload_id, n, expires_in=expires)
        if url is None:
            path = f"/v1/uploads/{upload.id}/parts/{n}"
            url = f"{settings.public_url}{path}?token={sign_url_token(settings.secret_key, path, expires)}"
        urls.append(PartUrl(part_number=n, url=url))
    return PartUrls(upload_id=upload.id, parts=urls, expires_at=utcnow() + timedelta(seconds=expires))


@router.put("/{upload_id}/parts/{part_number}", include_in_schema=False)
async def put_part(
    upload_id: Annotated[str, Path(pattern=ID_PATTERN)],
    part_number: Annotated[int, Path(ge=1, le=10_000)],
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    token: Annotated[str, Query()],
) -> Response:
    """Local backend only: the target of the API's own signed part URLs."""
    if not check_url_token(settings.secret_key, request.url.path, token):
        raise ApiError(403, "invalid_signature", "the part URL is invalid or expired")
    upload = session.get(Upload, upload_id)
    if upload is None:
        raise not_found("upload", upload_id)
    files.require_open(upload)
    import tempfile

    from starlette.concurrency import run_in_threadpool

    with tempfile.SpooledTemporaryFile(max_size=8 * 1024**2) as buf:
        async for chunk in request.stream():
            buf.write(chunk)
        buf.seek(0)
        etag = await run_in_threadpool(
            storage.put_part, upload.storage_key, upload.storage_upload_id, part_number, buf
        )
    return Response(status_code=200, headers={"ETag": f'"{etag}"'})


@router.post(
    "/{upload_id}/complete",
    response_model=UploadOut,
    dependencies=[IdempotencyKey],
    responses=responses(400, 401, 404, 409, 413, 422, 503),
)
def complete(
    upload: CurrentUpload,
    body: UploadComplete,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
) -> UploadOut:
    """Assemble the parts; the dataset or checkpoint is then validated (SHA-256 included) by a worker."""
    if upload.object_id is not None:  # completed already: answer the same
        return _out(upload)
    parts = [(p.part_number, p.etag) for p in body.parts]
    try:
        object_id = files.complete_upload(session=session, storage=storage, upload=upload, parts=parts)
    except ApiError:
        session.commit()
        raise
    session.commit()
    if upload.purpose == "dataset":
        send(settings, VALIDATE_DATASET, dataset_id=object_id)
    else:
        send(settings, VALIDATE_CHECKPOINT, checkpoint_id=object_id)
    return _out(upload)


@router.post(
    "/{upload_id}/abort",
    response_model=UploadOut,
    dependencies=[IdempotencyKey],
    responses=responses(400, 401, 404, 409, 413, 422, 503),
)
def abort(upload: CurrentUpload, session: SessionDep, storage: StorageDep, _tenant: TenantDep) -> UploadOut:
    files.abort_upload(storage=storage, upload=upload)
    session.commit()
    return _out(upload)
