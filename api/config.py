"""Settings of the API process (one pydantic-settings class, read from DISP_* environment variables)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PLACEHOLDER_SECRETS = {"", "changeme", "change-me", "secret", "dev"}
MAX_PRESIGN_SECONDS = 7 * 24 * 3600  # SigV4 caps presigned URLs at 7 days


class CommonSettings(BaseSettings):
    """Settings shared by the API and the worker: database, broker, storage, queues."""

    model_config = SettingsConfigDict(env_prefix="DISP_", env_file=".env", extra="ignore")

    database_url: str = "postgresql+psycopg://postgres@127.0.0.1:5432/disp"
    broker_url: str = "redis://127.0.0.1:6379/0"
    result_backend: str = "redis://127.0.0.1:6379/0"
    broker_transport_options: dict = Field(default_factory=dict)
    # Queues: GPU stages, CPU work (validation, webhooks). A prefix isolates test sessions on a shared broker.
    queue_prefix: str = ""
    # Redis visibility timeout: above the longest stage, else a running stage is delivered twice.
    visibility_timeout_s: int = 6 * 3600

    storage_backend: str = "s3"  # "s3" or "local"
    storage_root: Path = Path("./disp-data/storage")
    s3_endpoint_url: str | None = None
    s3_public_endpoint_url: str | None = None  # the endpoint clients reach, for presigned URLs
    s3_bucket: str = "disp"
    s3_region: str = "us-east-1"
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = None
    s3_create_bucket: bool = True
    presign_expiry_s: int = 3600

    # Signs local-backend upload/download URLs served by the API itself.
    secret_key: str = "changeme"
    environment: str = "production"  # "production", "development", "test"
    webhook_allow_private: bool = False  # allow webhook URLs on loopback / private networks

    # Input limits, checked before any GPU time is spent (docs/security.md lists them with their memory cost).
    max_archive_bytes: int = 50 * 1024**3  # one uploaded archive (presigned multipart)
    max_expanded_bytes: int = 200 * 1024**3  # an archive's entries, summed (zip-bomb guard)
    max_archive_entries: int = 50_000  # files in one archive; each costs ~3 KB of worker RSS while validated
    max_member_bytes: int = 2 * 1024**3  # any one file of a dataset archive
    max_compression_ratio: int = 200  # expanded / compressed size of a dataset archive's files (zip bombs)
    max_dataset_json_bytes: int = 24 * 1024**2  # the data file (JSON, JSONL, parquet, ...): read whole, ~9x in RSS
    max_json_depth: int = 64  # nesting of one record
    max_records: int = 1_000_000
    max_image_pixels: int = 25_000_000  # width x height, read from the header before decoding
    max_image_bytes: int = 32 * 1024**2
    max_checkpoint_json_bytes: int = 16 * 1024**2  # config.json, the shard index, tokenizer_config.json
    max_tokenizer_bytes: int = 64 * 1024**2  # tokenizer.json

    @field_validator("storage_backend")
    @classmethod
    def _backend(cls, value: str) -> str:
        if value not in ("s3", "local"):
            raise ValueError(f"storage_backend must be 's3' or 'local', got {value!r}")
        return value

    @field_validator("presign_expiry_s")
    @classmethod
    def _expiry(cls, value: int) -> int:
        if not 1 <= value <= MAX_PRESIGN_SECONDS:
            raise ValueError(f"presign_expiry_s must be in [1, {MAX_PRESIGN_SECONDS}], got {value}")
        return value

    @model_validator(mode="after")
    def _secret(self) -> CommonSettings:
        if self.environment == "production" and self.secret_key in PLACEHOLDER_SECRETS:
            raise ValueError("DISP_SECRET_KEY must be set to a real secret in production")
        return self

    def queue(self, name: str) -> str:
        return f"{self.queue_prefix}{name}"


class ApiSettings(CommonSettings):
    """The API process."""

    run_migrations: bool = True
    public_url: str = "http://127.0.0.1:8000"  # base of the API's own upload/download URLs
    max_upload_bytes: int = 512 * 1024**2  # multipart POST bodies
    max_json_body_bytes: int = 1024**2  # every other request body (JSON)
    metrics_token: str | None = None  # bearer token of GET /metrics; unset: /metrics answers 404
    part_size_bytes: int = 64 * 1024**2
    min_part_size_bytes: int = 5 * 1024**2  # S3 minimum for every part but the last
    upload_expiry_s: int = 24 * 3600
    idempotency_ttl_s: int = 24 * 3600
    page_limit_max: int = 100


@lru_cache
def get_settings() -> ApiSettings:
    return ApiSettings()
