"""Artifacts: purified projector, purified dataset, report; a presigned URL or a streamed download. Both honour
`Range` (S3 answers a presigned URL's ranges itself; the streamed download reads only the range from storage)."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Header, Path, Query
from fastapi.responses import StreamingResponse

from api.config import ApiSettings
from api.db.models import Artifact, utcnow
from api.deps import BearerDep, CurrentArtifact, SessionDep, SettingsDep, StorageDep, tenant_for_key
from api.errors import ApiError, not_found, responses
from api.schemas import ID_PATTERN, ArtifactOut
from api.security import check_url_token, sign_url_token
from api.storage import Storage

router = APIRouter(prefix="/artifacts", tags=["artifacts"])


def artifact_out(artifact: Artifact, settings: ApiSettings, storage: Storage) -> ArtifactOut:
    expires = settings.presign_expiry_s
    url = storage.presign_get(artifact.storage_key, filename=artifact.filename, expires_in=expires)
    if url is None:
        path = f"/v1/artifacts/{artifact.id}/content"
        url = f"{settings.public_url}{path}?token={sign_url_token(settings.secret_key, path, expires)}"
    out = ArtifactOut.model_validate(artifact, from_attributes=True)
    out.download_url, out.download_expires_at = url, utcnow() + timedelta(seconds=expires)
    return out


@router.get("/{artifact_id}", response_model=ArtifactOut, responses=responses(401, 404, 422))
def get_artifact(artifact: CurrentArtifact, settings: SettingsDep, storage: StorageDep) -> ArtifactOut:
    return artifact_out(artifact, settings, storage)


_RANGE = re.compile(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", re.IGNORECASE)


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The one byte range a `Range` header asks of an object of `size` bytes, as (first, last) inclusive and
    clipped to the object (RFC 9110 §14.1.2: `bytes=a-b`, `bytes=a-`, `bytes=-n`); None, so the whole object
    is sent, for no header, one that is not a single byte range, or a range with b < a. A range that starts
    past the end (or a suffix of 0 bytes) is refused with 416 and `Content-Range: bytes */size`."""
    match = _RANGE.fullmatch(header or "")
    if match is None or not any(match.groups()):
        return None
    first, last = match.groups()
    if not first:  # a suffix: the last n bytes (none of them: unsatisfiable)
        start, end = (max(0, size - int(last)), size - 1) if int(last) else (size, size - 1)
    elif last and int(last) < int(first):
        return None
    else:
        start, end = int(first), min(int(last), size - 1) if last else size - 1
    if start >= size:
        error = ApiError(
            416, "range_not_satisfiable", f"Range {header!r} starts past the object's {size} bytes"
        )
        error.headers = {"Content-Range": f"bytes */{size}"}
        raise error
    return start, end


@router.get(
    "/{artifact_id}/content",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "The whole artifact"},
        206: {
            "content": {"application/octet-stream": {}},
            "description": "The byte range asked for (`Range`)",
        },
        **responses(401, 403, 404, 416, 422),
    },
)
def download(
    artifact_id: Annotated[str, Path(pattern=ID_PATTERN)],
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    credentials: BearerDep,
    token: Annotated[
        str | None,
        Query(
            max_length=200,
            pattern=r"^[0-9]+\.[0-9a-f]+$",
            description="signed-URL token instead of an API key",
        ),
    ] = None,
    range_: Annotated[str | None, Header(alias="Range", include_in_schema=False)] = None,
    if_range: Annotated[str | None, Header(alias="If-Range", include_in_schema=False)] = None,
) -> StreamingResponse:
    """Stream the artifact's bytes (API key, or the token of its download URL). Resumable: `Range: bytes=a-b`
    (also `a-` and `-n`) gives 206 with `Content-Range`, a range past the end 416; with `If-Range` holding
    an `ETag` other than the artifact's, the whole artifact is sent."""
    artifact = session.get(Artifact, artifact_id)
    if token is not None:
        if not check_url_token(settings.secret_key, f"/v1/artifacts/{artifact_id}/content", token):
            raise ApiError(403, "invalid_signature", "the download URL is invalid or expired")
    else:
        tenant = tenant_for_key(session, credentials.credentials if credentials else None)
        if tenant is None:
            raise ApiError(401, "unauthorized", "Missing, invalid or revoked API key")
        if artifact is not None and artifact.tenant_id != tenant.id:
            artifact = None
    if artifact is None:
        raise not_found("artifact", artifact_id, "artifact_id")
    etag = f'"{artifact.sha256}"'
    headers = {
        "Content-Disposition": f'attachment; filename="{artifact.filename}"',
        "Content-Length": str(artifact.bytes),
        "X-Checksum-SHA256": artifact.sha256,
        "Accept-Ranges": "bytes",
        "ETag": etag,
    }
    wanted = byte_range(range_, artifact.bytes) if if_range is None or if_range.strip() == etag else None
    if wanted is None:
        return StreamingResponse(
            storage.iter_chunks(artifact.storage_key), media_type="application/octet-stream", headers=headers
        )
    start, end = wanted
    headers |= {
        "Content-Length": str(end - start + 1),
        "Content-Range": f"bytes {start}-{end}/{artifact.bytes}",
    }
    return StreamingResponse(
        storage.iter_chunks(artifact.storage_key, start, end),
        status_code=206,
        media_type="application/octet-stream",
        headers=headers,
    )
