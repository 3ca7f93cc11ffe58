"""Request and response bodies. Job settings mirror `disp.config` field by field, with the same defaults
(`tests/api/test_schemas.py` checks they agree); `disp.config` itself then validates the values."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LaViDaSettings(_Strict):
    step_ratio: float = Field(0.5, description="LaViDa: fraction of each block's denoising steps run.")
    step_per_block: int = Field(0, description="LaViDa: steps per block (0: gen_length / blocks); needs step_ratio 1.")
    schedule: Literal["uniform", "shift", "logit_normal"] = Field("shift", description="LaViDa: tokens per step.")
    shift: float = Field(0.33, description="LaViDa: s of the shift schedule.")
    prefix_lm: bool = Field(True, description="LaViDa: prefix-DLM attention.")
    kv_cache: bool = Field(True, description="LaViDa: reuse the prompt's keys/values; needs prefix_lm.")


class SamplerSettings(_Strict):
    gen_length: int = Field(32, description="Answer length in tokens.")
    block_length: int = Field(
        32, description="Block length of semi-autoregressive decoding; divides gen_length."
    )
    steps: int = Field(32, description="Denoising steps over the whole answer.")
    temperature: float = Field(0.0, description="Gumbel-noise temperature; 0 means deterministic argmax.")
    remasking: Literal["low_confidence", "random"] = Field("low_confidence", description="Commit order.")
    suppress_eos: bool = Field(
        True, description="Never propose EOS at masked positions (LLaDA-V); False: EOS allowed and ends the answer."
    )
    suppress_bos_headers: bool | None = Field(
        None, description="Never propose BOS or a header token at masked positions; unset: as suppress_eos."
    )
    lavida: LaViDaSettings = Field(default_factory=LaViDaSettings, description="LaViDa's sampler options.")


class SaliencySettings(_Strict):
    probes: int = Field(6, description="Hutchinson probes M per sample (Eq. 8).")
    topk: int = Field(5, description="Top-k vocabulary entries per generated position in the Fisher matrix.")
    factor: float = Field(0.5, description="Scale of the quadratic form (1/2 from the KL expansion, Eq. 4).")
    exact: bool = Field(False, description="Exact quadratic form via Jacobian-vector products (slow).")
    method: Literal["fisher", "occlusion", "isolation"] = Field(
        "fisher", description="'fisher' (the paper's quadratic form), 'occlusion' (the exact KL of Eq. 4, disp's variant) "
                              "or 'isolation' (the KL of showing visual token i alone against showing none, disp's variant)."
    )
    occlusion_rows: int = Field(64, description="Rows (sample x visual token) per forward of the occlusion and isolation methods.")
    batch_size: int = Field(8, description="Samples per scoring pass.")
    seed: int = Field(1234, description="Seed of the probe noise.")


class PurifySettings(_Strict):
    mask_ratio: float = Field(0.3, description="Fraction rho of visual tokens held masked (Eq. 9).")
    min_score: float = Field(
        0.0, description="Hold a top-rho token only if its saliency (nats) is at least this; 0: all (the paper)."
    )
    batch_size: int = Field(8, description="Samples generated together.")
    seed: int = Field(1234, description="Seed of sampling noise and of random masking.")
    question: Literal["sample", "describe"] = Field(
        "sample", description="Re-answer each sample's own question, or 'Describe this image in detail.' (official)."
    )
    sampler: SamplerSettings = Field(default_factory=SamplerSettings, description="Sampler settings.")


class FinetuneSettings(_Strict):
    epochs: int = Field(4, description="Passes over the purified data.")
    lr: float = Field(1e-4, description="Peak AdamW learning rate.")
    batch_size: int = Field(8, description="Samples per micro-batch.")
    grad_accum: int = Field(1, description="Micro-batches per optimiser step.")
    warmup_ratio: float = Field(0.03, description="Fraction of steps in linear warm-up before cosine decay.")
    weight_decay: float = Field(0.0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, description="Gradient-norm clip; 0 disables.")
    bf16: bool = Field(True, description="bf16 autocast on GPU.")
    seed: int = Field(1234, description="Seed of data order and diffusion noise.")
    anchor_weight: float = Field(
        0.0, description="Weight of the feature anchor on samples whose answer was kept (disp's, not the paper's; 0 = off)."
    )


class DefenseSettings(_Strict):
    """The CLI's defense flags: `disp.config.DefenseConfig`."""

    defense: Literal["disp", "none", "no_mask", "random_mask", "random_drop", "pruning", "oracle_filter"] = (
        Field("disp", description="Defense to run.")
    )
    drop_ratio: float = Field(0.2, description="Fraction of samples dropped by random_drop.")
    prune_ratio: float = Field(0.3, description="Fraction of projector weights zeroed by pruning.")
    saliency: SaliencySettings = Field(default_factory=SaliencySettings)
    purify: PurifySettings = Field(default_factory=PurifySettings)
    finetune: FinetuneSettings = Field(default_factory=FinetuneSettings)


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
