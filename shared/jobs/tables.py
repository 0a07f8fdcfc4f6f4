"""Database tables (SQLAlchemy 2 typed models). The job row is the truth about a job;
the broker message only carries its id."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from sqlalchemy import JSON, BigInteger, DateTime, Float, Index, Integer, String, Text, TypeDecorator, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from shared.jobs.job_status import JobStatus, ShardState


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_job_id() -> str:
    return uuid.uuid4().hex


class Base(DeclarativeBase):
    pass


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every database.

    PostgreSQL stores ``timestamptz``; SQLite has no zone, and SQLAlchemy's SQLite type
    silently drops it (a plain ``DateTime`` subclass is replaced by the dialect's own type,
    so overriding its result processor does nothing). A TypeDecorator runs on every dialect:
    values are converted to UTC on the way in (SQLite stores them naive, so string order is
    time order) and always come back tagged UTC. A naive value is taken to be UTC (the
    service only ever makes UTC times, `utcnow`).
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("owner", "idempotency_key", name="uq_jobs_owner_idempotency_key"),
        Index("ix_jobs_created", "created_at", "id"),
        Index("ix_jobs_owner_created", "owner", "created_at", "id"),
        Index("ix_jobs_status_created", "status", "created_at"),
        Index("ix_jobs_webhook_due", "webhook_state", "webhook_next_at"),
        Index("ix_jobs_retry_of", "retry_of", unique=True),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_job_id)
    owner: Mapped[str] = mapped_column(String(64), default="", doc="API key name; '' in open mode")
    idempotency_key: Mapped[str | None] = mapped_column(String(200), nullable=True)
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.queued.value)
    progress: Mapped[float] = mapped_column(Float, default=0.0)

    model: Mapped[str] = mapped_column(String(200))
    mode: Mapped[str] = mapped_column(String(16))
    params: Mapped[dict] = mapped_column(JSON, default=dict)

    image_key: Mapped[str] = mapped_column(String(500), doc="storage key of the upload")
    image_format: Mapped[str] = mapped_column(String(16))
    image_width: Mapped[int] = mapped_column(Integer)
    image_height: Mapped[int] = mapped_column(Integer)
    image_sha256: Mapped[str] = mapped_column(String(64))
    image_bytes: Mapped[int] = mapped_column(BigInteger)

    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    enqueued_at: Mapped[datetime | None] = mapped_column(
        UTCDateTime(), nullable=True, doc="last time the id was sent to the broker"
    )
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(200), nullable=True)
    claim_token: Mapped[str | None] = mapped_column(
        String(32), nullable=True, doc="set by the worker that holds the job; fences stale workers"
    )
    phase: Mapped[str | None] = mapped_column(
        String(16), nullable=True, doc="what a running job does now (JobPhase); set by the worker"
    )
    units_done: Mapped[int] = mapped_column(Integer, default=0, doc="tiles or window batches done")
    units_total: Mapped[int] = mapped_column(Integer, default=0)
    inference_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)

    error_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    result: Mapped[dict | None] = mapped_column(JSON, nullable=True, doc="summary + artifact keys")

    # webhooks (shared/jobs/webhook_store.py changes these; the sender in worker/webhook_delivery.py)
    callback_url: Mapped[str | None] = mapped_column(String(2000), nullable=True, doc="POSTed on a terminal state")
    webhook_state: Mapped[str | None] = mapped_column(
        String(16), nullable=True, doc="None until the first attempt; pending, delivered, gave_up, refused"
    )
    webhook_attempts: Mapped[int] = mapped_column(Integer, default=0)
    webhook_last_status: Mapped[int | None] = mapped_column(Integer, nullable=True, doc="HTTP status of the last try")
    webhook_last_error: Mapped[str | None] = mapped_column(String(300), nullable=True)
    webhook_last_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    webhook_next_at: Mapped[datetime | None] = mapped_column(
        UTCDateTime(), nullable=True, doc="next attempt (or the lease of the one in flight)"
    )
    # --- contract (migration "contract") ---
    request_fingerprint: Mapped[str | None] = mapped_column(
        String(64),
        nullable=True,
        doc="sha256 of the submitted parameters and image; an Idempotency-Key replay must match",
    )
    retry_of: Mapped[str | None] = mapped_column(
        String(32), nullable=True, doc="the failed or canceled job this one retries (unique: one retry per job)"
    )
    # --- shards (migration 0006, issue 16) ---
    shards_total: Mapped[int] = mapped_column(
        Integer, default=0, doc="0: one worker runs the job; N: its grid is computed as N shards (job_shards rows)"
    )
    assembler: Mapped[str | None] = mapped_column(
        String(32), nullable=True, doc="claim token of the shard run that assembles the outputs (set once, by election)"
    )


class JobShard(Base):
    """One band of a sharded job's grid (shared.jobs.shard_store): claimed, heart-beaten and
    committed like a job, so that any worker runs any shard and a dead one's shard runs again."""

    __tablename__ = "job_shards"
    __table_args__ = (Index("ix_job_shards_state_heartbeat", "state", "heartbeat_at"),)

    job_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    shard_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    state: Mapped[str] = mapped_column(String(16), default=ShardState.queued.value)
    row_start: Mapped[int] = mapped_column(Integer, doc="output rows [row_start, row_stop) of the job's grid")
    row_stop: Mapped[int] = mapped_column(Integer)
    work: Mapped[int] = mapped_column(Integer, default=0, doc="computed windows in the band")
    attempts: Mapped[int] = mapped_column(Integer, default=0, doc="runs claimed, backups included")
    token: Mapped[str | None] = mapped_column(
        String(32), nullable=True, doc="the run holding it (the winner once done)"
    )
    backup_token: Mapped[str | None] = mapped_column(String(32), nullable=True, doc="a straggler's backup run")
    worker: Mapped[str | None] = mapped_column(String(200), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    backup_sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    units_done: Mapped[int] = mapped_column(Integer, default=0)
    units_total: Mapped[int] = mapped_column(Integer, default=0)
    compute_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    result_key: Mapped[str | None] = mapped_column(String(500), nullable=True, doc="storage key of the partial grid")
