"""Every change of a job row, in one place. Each transition is a single conditional UPDATE
(compare-and-set on the status and, for a running job, on the claim token), so that the API,
any number of workers and the reconciler can race without a job running twice or a stale
worker overwriting a newer attempt.

    queued --claim--> running --finish--> succeeded | failed
       ^                 |   \\--cancel--> canceled (the worker notices at its next heartbeat)
       |                 |
       +---requeue-------+  (heartbeat older than STALE_AFTER_S, attempts < JOB_MAX_ATTEMPTS)
                         +--> failed "worker_lost" (attempts exhausted: no poison loop)
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, delete, exists, false, func, or_, select, text, tuple_, update
from sqlalchemy.orm import Session

from shared.jobs.job_status import ACTIVE, TERMINAL, JobPhase, JobStatus, ShardState, phase_progress
from shared.jobs.tables import Job, JobShard, utcnow

_ACTIVE = [s.value for s in ACTIVE]
_TERMINAL = [s.value for s in TERMINAL]


def _set(session: Session, condition, **values) -> bool:
    result = session.execute(update(Job).where(condition).values(**values).execution_options(synchronize_session=False))
    return result.rowcount == 1


def get_job(session: Session, job_id: str, owner: str | None = None) -> Job | None:
    job = session.get(Job, job_id)
    if job is None or (owner is not None and job.owner != owner):
        return None
    return job


def find_by_idempotency_key(session: Session, owner: str, key: str) -> Job | None:
    return session.scalars(select(Job).where(Job.owner == owner, Job.idempotency_key == key)).first()


def find_retry(session: Session, job_id: str) -> Job | None:
    """The job that retries `job_id` (jobs.retry_of is unique: one retry per job)."""
    return session.scalars(select(Job).where(Job.retry_of == job_id)).first()


def existing_ids(session: Session, job_ids: list[str]) -> set[str]:
    """Which of these ids have a row (read from the database, not the session's cache)."""
    found: set[str] = set()
    for start in range(0, len(job_ids), 500):
        chunk = job_ids[start : start + 500]
        found.update(session.scalars(select(Job.id).where(Job.id.in_(chunk))))
    return found


def count_active(session: Session, owner: str) -> int:
    return session.scalar(select(func.count()).select_from(Job).where(Job.owner == owner, Job.status.in_(_ACTIVE)))


def _serialize_owner(session: Session, owner: str) -> None:
    """Hold a lock, until the transaction ends, that every count-and-insert for `owner`
    takes: PostgreSQL's transaction-scoped advisory lock on a key derived from the owner;
    on SQLite a write statement (matching no row) takes the database's write lock."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        key = int.from_bytes(hashlib.sha256(f"heatmaps-quota:{owner}".encode()).digest()[:8], "big", signed=True)
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
    else:
        session.execute(update(Job).where(false()).values(status=Job.status))


def add_within_quota(session: Session, job: Job, max_active: int) -> bool:
    """Insert `job` unless its owner already has `max_active` queued or running jobs
    (0 = no limit). Count and insert are serialized per owner, so that concurrent
    submissions cannot all count below the limit and all insert (issue 11)."""
    if max_active:
        _serialize_owner(session, job.owner)
        if count_active(session, job.owner) >= max_active:
            return False
    session.add(job)
    session.flush()
    return True


def counts_by_status(session: Session) -> dict[str, int]:
    rows = session.execute(select(Job.status, func.count()).group_by(Job.status)).all()
    counts = {status.value: 0 for status in JobStatus}
    counts.update({status: count for status, count in rows})
    return counts


# --- listing with a cursor ---------------------------------------------------------------
@dataclass(frozen=True)
class Page:
    jobs: list[Job]
    next_cursor: str | None


class BadCursor(ValueError):
    pass


def encode_cursor(job: Job) -> str:
    raw = json.dumps([job.created_at.isoformat(), job.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


_CURSOR_ID_RE = re.compile(r"[0-9a-f]{32}")
_CURSOR_MAX_CHARS = 200


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """The (created_at, id) a cursor names, checked strictly: a cursor is client input and
    its values reach SQL (a NUL byte, say, is a data error on PostgreSQL)."""
    try:
        if len(cursor) > _CURSOR_MAX_CHARS:
            raise ValueError("cursor too long")
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, job_id = json.loads(raw)
        if not (isinstance(created, str) and created.isprintable() and _CURSOR_ID_RE.fullmatch(str(job_id))):
            raise ValueError("cursor values of the wrong kind")
        return datetime.fromisoformat(created), str(job_id)
    except (ValueError, TypeError, binascii.Error) as exc:
        raise BadCursor("invalid cursor") from exc


def list_jobs(session: Session, owner: str | None, status: str | None, limit: int, cursor: str | None) -> Page:
    """Newest first; `cursor` is the last job of the previous page."""
    query = select(Job)
    if owner is not None:
        query = query.where(Job.owner == owner)
    if status is not None:
        query = query.where(Job.status == status)
    if cursor:
        created, job_id = decode_cursor(cursor)
        query = query.where(tuple_(Job.created_at, Job.id) < tuple_(created, job_id))
    jobs = list(session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)))
    more = len(jobs) > limit
    jobs = jobs[:limit]
    return Page(jobs, encode_cursor(jobs[-1]) if more and jobs else None)


# --- transitions -------------------------------------------------------------------------
def mark_enqueued(session: Session, job_id: str) -> None:
    _set(session, and_(Job.id == job_id, Job.status == JobStatus.queued.value), enqueued_at=utcnow())


def claim(session: Session, job_id: str, worker: str) -> str | None:
    """queued -> running for this worker; returns the claim token, or None when the job is
    not queued any more (a duplicate delivery, a cancel, or another worker got it)."""
    token = uuid.uuid4().hex
    now = utcnow()
    claimed = _set(
        session,
        and_(Job.id == job_id, Job.status == JobStatus.queued.value),
        status=JobStatus.running.value,
        attempts=Job.attempts + 1,
        worker=worker[:200],
        claim_token=token,
        started_at=now,
        heartbeat_at=now,
        progress=0.0,
        phase=JobPhase.reading.value,
        units_done=0,
        units_total=0,
        assembler=None,
        shards_total=0,  # set again by the plan (shard_store.create_shards), which keeps the shards done
    )
    return token if claimed else None


def heartbeat(
    session: Session,
    job_id: str,
    token: str,
    units_done: int,
    units_total: int,
    phase: JobPhase = JobPhase.inference,
    fraction: float | None = None,
) -> bool:
    """Record progress; False means this worker no longer holds the job (canceled or re-queued).
    `fraction` of `phase` done (default: the inference units' fraction) sets `progress`
    within the phase's span (shared.jobs.job_status.PHASE_PROGRESS)."""
    if fraction is None:
        fraction = units_done / units_total if units_total else 0.0
    return _set(
        session,
        and_(Job.id == job_id, Job.claim_token == token, Job.status == JobStatus.running.value),
        heartbeat_at=utcnow(),
        units_done=units_done,
        units_total=units_total,
        phase=JobPhase(phase).value,
        progress=phase_progress(JobPhase(phase), fraction),
    )


def finish_succeeded(session: Session, job_id: str, token: str, result: dict, inference_seconds: float) -> bool:
    return _set(
        session,
        and_(Job.id == job_id, Job.claim_token == token, Job.status == JobStatus.running.value),
        status=JobStatus.succeeded.value,
        finished_at=utcnow(),
        progress=1.0,
        result=result,
        inference_seconds=inference_seconds,
        units_done=Job.units_total,
    )


def finish_failed(session: Session, job_id: str, token: str | None, code: str, message: str) -> bool:
    condition = and_(Job.id == job_id, Job.status.in_(_ACTIVE))
    if token is not None:
        condition = and_(Job.id == job_id, Job.claim_token == token, Job.status == JobStatus.running.value)
    return _set(
        session,
        condition,
        status=JobStatus.failed.value,
        finished_at=utcnow(),
        error_code=code,
        error_message=message[:2000],
    )


def cancel(session: Session, job_id: str) -> bool:
    """queued/running -> canceled. A running worker sees it at its next heartbeat and stops."""
    return _set(
        session,
        and_(Job.id == job_id, Job.status.in_(_ACTIVE)),
        status=JobStatus.canceled.value,
        finished_at=utcnow(),
        error_code=JobStatus.canceled.value,  # the reason is the status itself
        error_message="canceled by the client",
    )


def delete_finished(session: Session, job_id: str) -> bool:
    """Delete a finished job's row and its shard rows (one transaction)."""
    result = session.execute(delete(Job).where(Job.id == job_id, Job.status.in_(_TERMINAL)))
    if result.rowcount != 1:
        return False
    session.execute(delete(JobShard).where(JobShard.job_id == job_id))
    return True


# --- reconciliation ----------------------------------------------------------------------
def rescue_stale(session: Session, stale_after_s: float, max_attempts: int) -> tuple[list[str], list[str]]:
    """Running jobs whose worker stopped heart-beating: re-queue them, or fail them once they
    used all their attempts. Returns (requeued ids, failed ids). A sharded job computing its
    shards is left to its shards' own heartbeats (shared.jobs.shard_store.rescue_stale: its
    shards may wait in the queue for a long time); once assembling - or once every shard is
    done and nobody assembles (the last shard's worker died before its election) - it is
    watched like any job, and a re-queued job keeps the shards already done."""
    _undone_shard = exists().where(JobShard.job_id == Job.id, JobShard.state != ShardState.done.value)
    cutoff = utcnow() - timedelta(seconds=stale_after_s)
    stale = session.execute(
        select(Job.id, Job.attempts, Job.claim_token).where(
            Job.status == JobStatus.running.value,
            Job.heartbeat_at < cutoff,
            or_(Job.shards_total == 0, Job.assembler.is_not(None), ~_undone_shard),
        )
    ).all()
    requeued, failed = [], []
    for job_id, attempts, token in stale:
        same_attempt = and_(
            Job.id == job_id, Job.status == JobStatus.running.value, Job.claim_token == token, Job.heartbeat_at < cutoff
        )
        if attempts >= max_attempts:
            if _set(
                session,
                same_attempt,
                status=JobStatus.failed.value,
                finished_at=utcnow(),
                error_code="worker_lost",
                error_message=f"the worker running this job stopped responding on all {attempts} attempts",
            ):
                failed.append(job_id)
        elif _set(
            session,
            same_attempt,
            status=JobStatus.queued.value,
            claim_token=None,
            enqueued_at=None,
            worker=None,
            progress=0.0,
            assembler=None,
        ):
            requeued.append(job_id)
    return requeued, failed


def queued_to_send(session: Session, resend_after_s: float, grace_s: float = 2.0, limit: int = 500) -> list[str]:
    """Queued jobs whose message may be missing: never sent (broker was down), or sent
    longer ago than `resend_after_s` (broker lost it). A duplicate message is harmless:
    `claim` lets only one delivery run."""
    now = utcnow()
    rows = session.scalars(
        select(Job.id)
        .where(
            Job.status == JobStatus.queued.value,
            or_(
                and_(Job.enqueued_at.is_(None), Job.created_at < now - timedelta(seconds=grace_s)),
                Job.enqueued_at < now - timedelta(seconds=resend_after_s),
            ),
        )
        .order_by(Job.created_at)
        .limit(limit)
    )
    return list(rows)


def expired(session: Session, retention_hours: float, limit: int = 500) -> list[Job]:
    cutoff = utcnow() - timedelta(hours=retention_hours)
    return list(session.scalars(select(Job).where(Job.status.in_(_TERMINAL), Job.finished_at < cutoff).limit(limit)))
