"""One settings object for the API, the worker, migrations and the tools.

Every value comes from an environment variable of the same name (upper case) or from a
`.env` file in the working directory. Defaults make a laptop run need nothing installed:
a SQLite file and a storage folder under ``DATA_DIR``; ``REDIS_URL`` is left unset so that
the dev stack (``make serve`` / ``make demo``) starts an embedded Redis.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent
BUNDLED_MODELS_DIR = REPO_ROOT / "models"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", case_sensitive=False)

    # --- where things live -------------------------------------------------------------
    data_dir: Path = Field(Path("data"), description="Local folder for the embedded defaults.")
    scratch_dir: Path | None = Field(
        None,
        description=(
            "This stack's folder for jobs' scratch space (downloaded inputs, outputs before "
            "they are stored); default <temp>/heatmaps-scratch-<tag of database, queue and "
            "storage>. Workers sweep only this folder, so stacks on one machine keep theirs."
        ),
    )
    database_url: str | None = Field(None, description="SQLAlchemy URL; default sqlite:///DATA_DIR/heatmap.db")
    redis_url: str | None = Field(None, description="Broker and rate-limit store; unset = embedded (dev only).")
    storage_url: str | None = Field(None, description="fsspec URL for uploads and artifacts; default DATA_DIR/storage.")
    models_dir: Path | None = Field(
        None, description="Extra folder scanned for user models (<name>.keras + <name>.json)."
    )
    vgg16_weights: Path | None = Field(None, description="Explicit path of VGG16 ImageNet weights (.h5).")
    default_model: str = "shapes"
    queue_name: str = "heatmaps"

    # --- limits --------------------------------------------------------------------------
    max_upload_mb: float = Field(512, gt=0, description="Largest accepted upload (413 above).")
    max_form_memory_kb: int = Field(
        512,
        ge=128,
        description="Largest non-file form field (413 above); werkzeug reads 64 KiB chunks, so at least 128.",
    )
    max_form_parts: int = Field(64, gt=0, description="Most multipart parts in one request (413 above).")
    max_image_pixels: int = Field(200_000_000, gt=0, description="Refused from the header, before decoding.")
    memory_budget_mb: int = Field(
        1024, gt=0, description="Direct mode splits the image into row bands or tiles to stay under this."
    )
    max_batch_size: int = Field(256, gt=0)
    max_top_k: int = Field(20, gt=0)

    # --- access control ------------------------------------------------------------------
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description=(
            "Comma-separated 'name:sha256hex' entries (see `python -m shared.security hash NAME`). Empty = open mode."
        ),
    )
    rate_limit_per_minute: int = Field(60, ge=0, description="Submissions per key per minute; 0 = unlimited.")
    max_active_jobs_per_key: int = Field(50, ge=0, description="Queued+running jobs per key; 0 = unlimited.")

    # --- worker process -------------------------------------------------------------------
    worker_name: str | None = Field(
        None, description="Name recorded on the jobs this worker runs; default hostname:pid."
    )
    worker_preload_models: Annotated[list[str], NoDecode] | None = Field(
        None, description="Comma-separated models loaded and converted at worker start; default DEFAULT_MODEL."
    )
    worker_reconciler: bool = Field(True, description="Run the reconciler thread in the worker's main process.")
    worker_threads: int | None = Field(
        None,
        ge=0,
        description=(
            "Compute threads of one worker's pool process (TensorFlow intra-op threads, torch threads, "
            "OMP_NUM_THREADS); unset or 0 = the backend's default, every core. Set it when several workers "
            "share one machine's CPUs (cores / workers; `make serve WORKERS=N` does), or each of them "
            "starts a pool of all cores and they oversubscribe."
        ),
    )

    # --- precision ----------------------------------------------------------------------
    worker_precision: str = Field(
        "float32",
        description=(
            "Compute precision of jobs that name none: float32 (exact), bfloat16 (faster on GPUs and on CPUs "
            "with avx512_bf16/AMX), float16 (GPU only)."
        ),
    )

    model_cache_dir: Path | None = Field(
        None,
        description=(
            "Folder of the disk cache of loaded models (raw weights keyed by the model file's sha256 and the "
            "engine version), so a cold worker or `heatmap infer` skips Keras' weight parsing; default "
            "DATA_DIR/model-cache. Set MODEL_CACHE=false to load every model from its file."
        ),
    )
    model_cache: bool = Field(True, description="Use the disk cache of loaded models (MODEL_CACHE_DIR).")
    compiled_calls: bool = Field(
        True,
        description=(
            "Run the engine's network calls (trunk tiles, rows-scheme stages, head, tiled batches) as "
            "tf.function compiled per input shape and kept with the warm model (TensorFlow); false: eager "
            "calls, for comparison (docs/engine.md, compiled calls)."
        ),
    )

    @field_validator("worker_precision")
    @classmethod
    def _check_precision(cls, value: str) -> str:
        from shared.jobspec import PRECISIONS

        if value not in PRECISIONS:
            raise ValueError(f"WORKER_PRECISION must be one of {', '.join(PRECISIONS)}")
        return value

    # --- job lifecycle -------------------------------------------------------------------
    job_max_attempts: int = Field(3, ge=1, description="Runs of one job before it is failed (worker deaths count).")
    job_soft_time_limit_s: int = Field(3300, gt=0)
    job_time_limit_s: int = Field(3600, gt=0)
    broker_visibility_timeout_s: int = Field(7200, gt=0, description="Must exceed the longest job.")
    heartbeat_interval_s: float = Field(2.0, gt=0)
    stale_after_s: float = Field(60.0, gt=0, description="A running job whose heartbeat is older is re-queued.")
    requeue_queued_after_s: float = Field(120.0, gt=0, description="A queued job older than this is re-sent.")
    reconcile_interval_s: float = Field(10.0, gt=0)
    retention_hours: float = Field(168.0, gt=0, description="Finished jobs and their files are deleted after this.")
    transient_retries: int = Field(3, ge=0, description="Retries of a database or storage call before failing.")

    # --- shards: one large job over many workers (issue 16, docs/operations.md) -----------
    shards_max: int = Field(
        16,
        ge=1,
        description=(
            "Most shards one job is split into (the `shards` parameter's upper bound, and what `auto` "
            "never exceeds); about the number of workers a single job may occupy at once."
        ),
    )
    straggler_factor: float = Field(
        3.0,
        gt=1,
        description=(
            "A shard still running when every other shard of its job is done, for longer than this many "
            "times their median duration, gets a backup run on another worker; the first to commit wins."
        ),
    )
    straggler_min_s: float = Field(
        60.0, ge=0, description="No backup run for a shard that has run less than this (seconds)."
    )

    # --- large images (region reads, masks, input by reference) --------------------------
    max_region_pixels: int = Field(
        40_000_000_000,
        gt=0,
        description="Pixel limit of region-readable images (tiled/pyramidal TIFF, slides): never decoded whole.",
    )
    mask_min_fraction: float = Field(
        0.25, ge=0, le=1, description="Windows with less of their area inside the mask are not computed (NaN)."
    )
    input_url_prefixes: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated fsspec URL prefixes an image_url may start with; empty = image_url off.",
    )

    @field_validator("input_url_prefixes", mode="before")
    @classmethod
    def _split_prefixes(cls, value):
        if value is None:
            return []
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    # --- viewer image tiles (read from the job's input by the API, issue 17) ---------------
    tile_threads: int = Field(
        2, ge=1, description="Threads per API process that read, resize and encode viewer image tiles."
    )
    tile_cache_mb: int = Field(
        64, ge=0, description="Encoded viewer tiles kept per API process (least recently used out); 0 = none."
    )
    tile_open_sources: int = Field(
        8, ge=1, description="Job inputs kept open per API process for tile reads (opening a slide is costly)."
    )

    # --- webhooks -----------------------------------------------------------------------
    webhook_secret: str | None = Field(
        None, description="HMAC-SHA256 key of the X-Heatmap-Signature header; unset = callback_url refused."
    )
    webhook_allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description=(
            "Comma-separated callback destinations: host names (example.com, *.example.com), IP addresses, "
            "or URL prefixes (https://hooks.example.com/in/). Empty = callback_url refused."
        ),
    )
    webhook_allowed_networks: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description=(
            "Comma-separated CIDR networks a callback may resolve to although they are private, loopback, "
            "link-local or metadata addresses (refused otherwise)."
        ),
    )
    webhook_timeout_s: float = Field(5.0, gt=0, description="One delivery attempt: connect + response timeout.")
    webhook_deadline_s: float = Field(
        15.0,
        gt=0,
        description=(
            "Longest one delivery attempt may take in all (connect, send, response headers); a "
            "receiver that trickles its answer is cut off then and the attempt counts as failed."
        ),
    )
    webhook_host_concurrency: int = Field(
        2,
        ge=1,
        description=(
            "Deliveries in flight at once per worker to one receiver (scheme, host and port), and "
            "never all WEBHOOK_CONCURRENCY threads: one slow receiver cannot hold every tenant's."
        ),
    )
    webhook_retry_base_s: float = Field(2.0, gt=0, description="First retry delay; doubles after each failure.")
    webhook_retry_max_delay_s: float = Field(300.0, gt=0, description="Longest wait between two attempts.")
    webhook_give_up_after_s: float = Field(
        3600.0, gt=0, description="No attempt starts later than this after the job finished; then it gave up."
    )
    webhook_poll_interval_s: float = Field(1.0, gt=0, description="How often the sender looks for due deliveries.")
    webhook_concurrency: int = Field(4, ge=1, description="Deliveries in flight at once per worker (threads).")
    webhook_sender: bool = Field(True, description="Run the webhook sender thread in the worker's main process.")

    # --- metrics ------------------------------------------------------------------------
    metrics_token: str | None = Field(
        None, description="When set, GET /metrics needs 'Authorization: Bearer <token>' (else 401)."
    )

    # --- object storage -----------------------------------------------------------------
    s3_endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint (MinIO, Ceph, moto) for s3:// STORAGE_URL; unset = AWS."
    )

    # --- dev stack ---------------------------------------------------------------------
    instance_token: str | None = Field(
        None,
        description=(
            "Sent back by /readyz in the X-Heatmaps-Instance header; the dev stack sets a fresh one per run"
            " to tell its own API from another process answering on the same port."
        ),
    )

    # --- orphan sweep --------------------------------------------------------------------
    orphan_grace_s: float = Field(
        3600.0,
        gt=0,
        description=(
            "The reconciler removes upload and result folders of job ids without a row once nothing in them"
            " changed for this long (longer than storing one upload or one job's results takes)."
        ),
    )

    @field_validator("worker_preload_models", mode="before")
    @classmethod
    def _split_models(cls, value):
        """Unset means the default model; an empty value means none."""
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("api_keys", "webhook_allowed_hosts", "webhook_allowed_networks", mode="before")
    @classmethod
    def _split_keys(cls, value):
        if value is None:
            return []
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    # --- API contract ----------------------------------------------------------------------
    poll_retry_after_s: int = Field(
        2, ge=1, description="Retry-After (seconds) on responses about a queued or running job: when to poll again."
    )

    @field_validator("api_keys")
    @classmethod
    def _check_keys(cls, value: list[str]) -> list[str]:
        for entry in value:
            name, _, digest = entry.partition(":")
            if not name or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest.lower()):
                raise ValueError("API_KEYS entries must be 'name:<sha256 hex of the key>'")
        return value

    # --- derived values ------------------------------------------------------------------
    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'heatmap.db').resolve()}"

    @property
    def resolved_storage_url(self) -> str:
        if self.storage_url:
            return self.storage_url
        return str((self.data_dir / "storage").resolve())

    @property
    def resolved_scratch_dir(self) -> Path:
        if self.scratch_dir is not None:
            return Path(self.scratch_dir)
        import tempfile

        identity = f"{self.resolved_database_url}|{self.queue_name}|{self.resolved_storage_url}"
        tag = hashlib.sha256(identity.encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"heatmaps-scratch-{tag}"

    @property
    def resolved_model_cache_dir(self) -> Path | None:
        """The model cache's folder, None when the cache is off."""
        if not self.model_cache:
            return None
        return Path(self.model_cache_dir) if self.model_cache_dir is not None else self.data_dir / "model-cache"

    @property
    def model_dirs(self) -> list[Path]:
        dirs = [BUNDLED_MODELS_DIR]
        if self.models_dir is not None:
            dirs.append(Path(self.models_dir))
        return dirs

    @property
    def key_hashes(self) -> dict[str, str]:
        """sha256 hex digest -> key name."""
        out = {}
        for entry in self.api_keys:
            name, _, digest = entry.partition(":")
            out[digest.lower()] = name
        return out

    @property
    def preload_models(self) -> list[str]:
        """Models the worker loads at start (WORKER_PRELOAD_MODELS, else the default model)."""
        if self.worker_preload_models is None:
            return [self.default_model]
        return self.worker_preload_models

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
