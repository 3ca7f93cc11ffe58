"""Artifacts: purified projector, purified dataset, report; a presigned URL or a streamed download."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Path, Query
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


@router.get(
    "/{artifact_id}/content",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}}, **responses(401, 403, 404, 422)},
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
) -> StreamingResponse:
    """Stream the artifact's bytes (API key, or the token of its download URL)."""
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
    headers = {
        "Content-Disposition": f'attachment; filename="{artifact.filename}"',
        "Content-Length": str(artifact.bytes),
        "X-Checksum-SHA256": artifact.sha256,
    }
    return StreamingResponse(
        storage.iter_chunks(artifact.storage_key), media_type="application/octet-stream", headers=headers
    )
