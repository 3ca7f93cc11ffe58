"""Request and response bodies. Job settings are generated from `disp.config` (`api.settings_schema`)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from api.settings_schema import settings_model
from disp.config import DefenseConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


DefenseSettings = settings_model(DefenseConfig)  # and its sections: SamplerSettings, SaliencySettings, ...


class JobCreate(_Strict):
    dataset_id: str
    checkpoint_id: str
    settings: DefenseSettings = Field(default_factory=DefenseSettings)
    webhook_url: str | None = Field(None, description="Receives signed stage-change and completion events.")
    shard_size: int | None = Field(None, ge=1, description="Records per scoring/purification shard.")
    metadata: dict[str, str] = Field(default_factory=dict, description="Up to 16 string pairs.")


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


class UploadCreate(_Strict):
    purpose: Literal["dataset", "checkpoint"]
    filename: str = Field(min_length=1, max_length=300)
    bytes: int = Field(gt=0, description="Total size; the completed object must match it.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="Hex SHA-256 of the whole file.")
    name: str | None = None
    kind: Literal["full", "adapter"] = "full"
    base_model: str | None = Field(None, description="Base model id or name, for adapters.")
    part_size: int | None = Field(None, description="Bytes per part; the service picks one if unset.")


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


class PartsRequest(_Strict):
    part_numbers: list[int] | None = Field(None, description="Which parts; all when omitted.")


class CompletedPart(_Strict):
    part_number: int = Field(ge=1, le=10_000)
    etag: str


class UploadComplete(_Strict):
    parts: list[CompletedPart] = Field(min_length=1)


class TenantOut(BaseModel):
    object: Literal["tenant"] = "tenant"
    id: str
    name: str
    webhook_secret: str
