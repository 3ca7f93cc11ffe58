"""Request and response bodies. Job settings are generated from `disp.config` (`api.settings_schema`)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from api.settings_schema import settings_model
from disp.config import DefenseConfig

# Request strings reach PostgreSQL, which stores no NUL character: every one is bounded and NUL-free.
NO_NUL = r"^[^\x00]*$"
ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"  # object ids (`job_...`) and cursors
MODEL_REF_PATTERN = r"^[A-Za-z0-9._-]{1,200}$"  # a base model's id or name
BIGINT_MAX = 2**63 - 1

ObjectId = Annotated[str, Field(pattern=ID_PATTERN, description="An object id, e.g. `ds_0190...`.")]
Name = Annotated[str, Field(min_length=1, max_length=300, pattern=NO_NUL)]
ModelRef = Annotated[str, Field(pattern=MODEL_REF_PATTERN, description="Base model id or name.")]
MetadataKey = Annotated[str, Field(min_length=1, max_length=64, pattern=NO_NUL)]
MetadataValue = Annotated[str, Field(max_length=512, pattern=NO_NUL)]
# A checkpoint is "full" (a whole checkpoint directory) or "projector" (one projector .safetensors laid over a
# registered base model). "adapter", the kind's former name, is still accepted and stored as "projector".
CheckpointKind = Literal["full", "projector", "adapter"]
CHECKPOINT_KIND_HELP = (
    "full: a whole checkpoint directory (archive); projector: one projector .safetensors laid over a registered "
    "base model (needs base_model; 'adapter' is accepted as its former name)"
)


def checkpoint_kind(kind: str) -> str:
    """The stored kind of a requested one ('adapter' -> 'projector')."""
    return "projector" if kind == "adapter" else kind


class _Request(BaseModel):
    """A request body: unknown fields refused, and JSON types taken as written (`false` is not a number,
    `54.0` is not an integer)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class ErrorDetail(BaseModel):
    code: str = Field(description="Machine-readable error code, e.g. `not_found`, `payload_too_large`.")
    message: str = Field(description="What is wrong, naming the limit or the field where there is one.")
    param: str | None = Field(None, description="The request field or header at fault, if any.")
    request_id: str | None = Field(None, description="The `X-Request-Id` of the request.")


class ErrorResponse(BaseModel):
    """The body of every error response."""

    error: ErrorDetail


DefenseSettings = settings_model(DefenseConfig)  # and its sections: SamplerSettings, SaliencySettings, ...


class JobCreate(_Request):
    dataset_id: ObjectId
    checkpoint_id: ObjectId
    settings: DefenseSettings = Field(default_factory=DefenseSettings)
    webhook_url: str | None = Field(
        None, max_length=2000, pattern=NO_NUL, description="Receives signed stage-change and completion events."
    )
    shard_size: int | None = Field(None, ge=1, le=1_000_000, description="Records per scoring/purification shard.")
    metadata: dict[MetadataKey, MetadataValue] = Field(
        default_factory=dict, max_length=16, description="Up to 16 string pairs."
    )


class Progress(BaseModel):
    stage: str | None
    done: int
    total: int


class JobOut(BaseModel):
    object: Literal["job"] = "job"
    id: str
    status: str
    stage: str | None
    progress: Progress
    eta: datetime | None
    metrics: dict[str, Any]
    error: dict[str, Any] | None
    dataset_id: str
    checkpoint_id: str
    settings: dict[str, Any]
    webhook_url: str | None
    metadata: dict[str, Any]
    cancel_requested: bool
    artifact_ids: list[str]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class Page(BaseModel):
    object: Literal["list"] = "list"
    data: list[Any]
    has_more: bool
    next_cursor: str | None = None


class JobList(Page):
    data: list[JobOut]


class EventOut(BaseModel):
    object: Literal["job.event"] = "job.event"
    id: int
    job_id: str
    created_at: datetime
    level: str
    type: str
    message: str
    data: dict[str, Any]


class EventList(Page):
    data: list[EventOut]


class ArtifactOut(BaseModel):
    object: Literal["artifact"] = "artifact"
    id: str
    job_id: str
    kind: str
    filename: str
    bytes: int
    sha256: str
    created_at: datetime
    download_url: str | None = None
    download_expires_at: datetime | None = None


class ArtifactList(Page):
    data: list[ArtifactOut]


class DatasetOut(BaseModel):
    object: Literal["dataset"] = "dataset"
    id: str
    name: str
    status: str
    archive_format: str
    bytes: int
    sha256: str
    num_records: int | None
    num_images: int | None
    error: dict[str, Any] | None
    created_at: datetime


class DatasetList(Page):
    data: list[DatasetOut]


class CheckpointOut(BaseModel):
    object: Literal["checkpoint"] = "checkpoint"
    id: str
    name: str
    kind: str
    base_model_id: str | None
    status: str
    archive_format: str
    bytes: int
    sha256: str
    error: dict[str, Any] | None
    created_at: datetime


class CheckpointList(Page):
    data: list[CheckpointOut]


class ModelOut(BaseModel):
    object: Literal["model"] = "model"
    id: str
    name: str
    bytes: int
    sha256: str
    created_at: datetime


class ModelList(Page):
    data: list[ModelOut]


class UploadCreate(_Request):
    purpose: Literal["dataset", "checkpoint"]
    filename: Name
    bytes: int = Field(gt=0, le=BIGINT_MAX, description="Total size; the completed object must match it.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="Hex SHA-256 of the whole file.")
    name: Name | None = None
    kind: CheckpointKind = Field("full", description=CHECKPOINT_KIND_HELP)
    base_model: ModelRef | None = Field(None, description="Base model id or name, for kind=projector.")
    part_size: int | None = Field(
        None, ge=1, le=5 * 1024**3, description="Bytes per part (S3 allows at most 5 GiB); the service picks one if unset."
    )


class PartUrl(BaseModel):
    part_number: int
    url: str
    method: Literal["PUT"] = "PUT"


class UploadOut(BaseModel):
    object: Literal["upload"] = "upload"
    id: str
    purpose: str
    filename: str
    bytes: int
    part_size: int
    num_parts: int
    status: str
    object_id: str | None
    expires_at: datetime
    created_at: datetime


class PartUrls(BaseModel):
    upload_id: str
    parts: list[PartUrl]
    expires_at: datetime


class PartsRequest(_Request):
    part_numbers: list[Annotated[int, Field(ge=1, le=10_000)]] | None = Field(
        None, max_length=10_000, description="Which parts; all when omitted."
    )


class CompletedPart(_Request):
    part_number: int = Field(ge=1, le=10_000)
    etag: str = Field(min_length=1, max_length=200, pattern=NO_NUL)


class UploadComplete(_Request):
    parts: list[CompletedPart] = Field(min_length=1, max_length=10_000)


class TenantOut(BaseModel):
    object: Literal["tenant"] = "tenant"
    id: str
    name: str
    webhook_secret: str
