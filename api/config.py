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
    # RabbitMQ redelivers a task the moment its worker's connection drops (a killed worker); a Redis broker
    # only after `visibility_timeout_s`. Task results are not used (jobs live in the database).
    broker_url: str = "amqp://guest:guest@127.0.0.1:5672//"
    result_backend: str = "redis://127.0.0.1:6379/0"
    broker_transport_options: dict = Field(default_factory=dict)
    broker_heartbeat_s: int = 30  # AMQP heartbeats: a vanished worker host is noticed within ~2x this
    # Queues: GPU stages, CPU work (validation, webhooks). A prefix isolates test sessions on a shared broker.
    queue_prefix: str = ""
    # Redis broker only: above the longest stage, else a running stage is delivered twice.
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
    # The web console (/console) draws heatmaps over the dataset's images: it downloads a dataset archive of at
    # most this size once per process into this folder (None: the temp dir); larger ones are drawn over grey.
    console_max_archive_bytes: int = 1024**3
    console_cache_dir: Path | None = None

    # Load shedding (per API process; `api_workers` processes per host): what cannot start within
    # `admission_wait_s` is answered 503 with Retry-After at once rather than queued until clients time out.
    api_workers: int = 2  # uvicorn processes of `python -m api.serve` (one per core)
    max_concurrent_requests: int = 8  # requests running at once, per process (at most db_pool_size)
    max_concurrent_uploads: int = 4  # requests with bodies over 1 MiB, per process (own DB sessions)
    max_streams: int = 200  # open job event streams, per process
    admission_wait_s: float = 0.25
    retry_after_s: int = 1  # Retry-After of a 503
    db_pool_size: int = 12  # connections per process: requests + uploads
    db_pool_overflow: int = 8  # more, briefly: event-stream polls, idempotency records
    db_pool_timeout_s: float = 2.0  # waiting longer for a connection is a 503
    stream_poll_s: float = 1.0  # an event stream looks for new events this often
    stream_max_s: float = 600.0  # then it ends; clients reconnect with Last-Event-ID
    # Per-tenant limits (token buckets in Redis shared by all API processes; empty: not limited).
    rate_limit_redis_url: str | None = "redis://127.0.0.1:6379/0"
    rate_limit_per_s: float = 50.0  # authenticated requests per second, sustained
    rate_limit_burst: int = 100
    job_create_per_min: float = 60.0
    job_create_burst: int = 20
    max_active_jobs: int = 50  # jobs not yet finished, per tenant (429 quota_exceeded beyond)

    @model_validator(mode="after")
    def _pool(self) -> ApiSettings:
        lanes = self.max_concurrent_requests + self.max_concurrent_uploads
        if self.max_concurrent_requests > 0 and self.db_pool_size < lanes:
            raise ValueError(
                f"db_pool_size ({self.db_pool_size}) must cover max_concurrent_requests + "
                f"max_concurrent_uploads ({lanes}), else requests wait for connections"
            )
        return self


@lru_cache
def get_settings() -> ApiSettings:
    return ApiSettings()
