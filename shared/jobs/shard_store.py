"""Every change of a shard row, in one place (issue 16: one job, many workers).

A large job's grid is computed as bands of output rows (``worker.inference.shard_bands``), one
``job_shards`` row each. The job row stays ``running``, held by the token of the worker that
planned it; the shards are claimed, heart-beaten and committed as jobs are (one conditional
UPDATE each), so that any worker runs any shard and races resolve in the database:

    queued --claim--> running --commit--> done      (the first commit of the shard wins)
       ^                 |  \\--fail---> failed     (bad input: the job fails with that reason)
       +---requeue-------+  (heartbeat older than STALE_AFTER_S; the job fails "worker_lost"
                             once the shard used JOB_MAX_ATTEMPTS)

When the last shard commits, exactly one process assembles: `elect_assembler` is a single
UPDATE of the job row that succeeds only while no shard is left undone and nobody was
elected (a counter in the database, not a Celery chord, whose body is skipped when a header
task is retried or fails). A straggler - the last shard running far longer than the others
took - may get a backup run (`backup_token`); whichever commits first wins, the other sees
the shard done at its next heartbeat and removes its partial file.
"""

from __future__ import annotations

import statistics
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import and_, delete, exists, func, or_, select, update
from sqlalchemy.orm import Session

from shared.jobs.job_status import JobPhase, JobStatus, ShardState, phase_progress
from shared.jobs.tables import Job, JobShard, utcnow

_RUNNING = JobStatus.running.value


@dataclass(frozen=True)
class BandRows:
    """What a shard row records of its band: output rows [row_start, row_stop) and its work."""

    row_start: int
    row_stop: int
    work: int


def _held(job_id: str, index: int, token: str):
    """The shard is running and this run (its primary or its backup) holds it."""
    return and_(
        JobShard.job_id == job_id,
        JobShard.shard_index == index,
        JobShard.state == ShardState.running.value,
        or_(JobShard.token == token, JobShard.backup_token == token),
    )


def _job_running(session: Session, job_id: str) -> bool:
    return session.scalar(select(Job.status).where(Job.id == job_id)) == _RUNNING


def get_shards(session: Session, job_id: str) -> list[JobShard]:
    return list(session.scalars(select(JobShard).where(JobShard.job_id == job_id).order_by(JobShard.shard_index)))


def create_shards(session: Session, job_id: str, job_token: str, bands: list[BandRows]) -> list[int] | None:
    """Record the job's bands (held by `job_token`); returns the shard indices to send, or
    None when the job is no longer held. A re-planned job (its planner or assembler died)
    with the same bands keeps the shards already done (resume) and re-queues the others; a
    different plan replaces them all."""
    if not _job_held(session, job_id, job_token):
        return None
    existing = get_shards(session, job_id)
    same = [(s.row_start, s.row_stop) for s in existing] == [(b.row_start, b.row_stop) for b in bands]
    if existing and same:
        pending = [s.shard_index for s in existing if s.state != ShardState.done.value]
        session.execute(
            update(JobShard)
            .where(JobShard.job_id == job_id, JobShard.state != ShardState.done.value)
            .values(state=ShardState.queued.value, token=None, backup_token=None, enqueued_at=None, backup_sent_at=None)
            .execution_options(synchronize_session=False)
        )
    else:
        session.execute(delete(JobShard).where(JobShard.job_id == job_id))
        session.add_all(
            JobShard(
                job_id=job_id,
                shard_index=index,
                state=ShardState.queued.value,
                row_start=band.row_start,
                row_stop=band.row_stop,
                work=band.work,
                attempts=0,
                units_done=0,
                units_total=0,
            )
            for index, band in enumerate(bands)
        )
        pending = list(range(len(bands)))
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.claim_token == job_token)
        .values(shards_total=len(bands), assembler=None, phase=JobPhase.inference.value, heartbeat_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    session.flush()
    return pending


def _job_held(session: Session, job_id: str, job_token: str) -> bool:
    held = session.scalar(
        select(func.count()).where(Job.id == job_id, Job.claim_token == job_token, Job.status == _RUNNING)
    )
    return bool(held)


def mark_enqueued(session: Session, job_id: str, index: int, backup: bool = False) -> None:
    column = "backup_sent_at" if backup else "enqueued_at"
    session.execute(
        update(JobShard)
        .where(JobShard.job_id == job_id, JobShard.shard_index == index)
        .values({column: utcnow()})
        .execution_options(synchronize_session=False)
    )


def claim(session: Session, job_id: str, index: int, worker: str, backup: bool = False) -> str | None:
    """queued -> running for this run (or, as a `backup`, a second run of a running shard);
    returns its token, or None when there is nothing to run (a duplicate message, the shard
    done or taken, the job canceled, failed or deleted)."""
    if not _job_running(session, job_id):
        return None
    token = uuid.uuid4().hex
    now = utcnow()
    shard = and_(JobShard.job_id == job_id, JobShard.shard_index == index)
    if backup:
        condition = and_(shard, JobShard.state == ShardState.running.value, JobShard.backup_token.is_(None))
        values = {"backup_token": token, "attempts": JobShard.attempts + 1, "heartbeat_at": now}
    else:
        condition = and_(shard, JobShard.state == ShardState.queued.value)
        values = {
            "state": ShardState.running.value,
            "token": token,
            "attempts": JobShard.attempts + 1,
            "worker": worker[:200],
            "started_at": now,
            "heartbeat_at": now,
            "units_done": 0,
            "units_total": 0,
        }
    result = session.execute(
        update(JobShard).where(condition).values(**values).execution_options(synchronize_session=False)
    )
    return token if result.rowcount == 1 else None


def heartbeat(session: Session, job_id: str, index: int, token: str, units_done: int, units_total: int) -> bool:
    """Record the shard's progress and the job's (the sum over its shards); False when this
    run no longer holds the shard (done by another run, re-queued) or the job stopped running."""
    now = utcnow()
    held = session.execute(
        update(JobShard)
        .where(_held(job_id, index, token))
        .values(heartbeat_at=now, units_done=units_done, units_total=units_total)
        .execution_options(synchronize_session=False)
    )
    if held.rowcount != 1:
        return False
    rows = session.execute(
        select(JobShard.state, JobShard.units_done, JobShard.units_total, JobShard.work).where(
            JobShard.job_id == job_id
        )
    ).all()
    done, total = sum(int(r.units_done) for r in rows), sum(int(r.units_total) for r in rows)
    fraction = job_fraction([(r.state, r.units_done, r.units_total, r.work) for r in rows])
    updated = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == _RUNNING, Job.assembler.is_(None))
        .values(
            heartbeat_at=now,
            units_done=done,
            units_total=total,
            phase=JobPhase.inference.value,
            progress=phase_progress(JobPhase.inference, fraction),
        )
        .execution_options(synchronize_session=False)
    )
    return updated.rowcount == 1


def job_fraction(shards: list[tuple[str, int, int, int]]) -> float:
    """Inference done over the whole job from its shards' (state, units done, units total,
    work): each shard's own fraction (1 once done, 0 before it reported), weighted by the
    computed windows of its band, so that a big band counts for what it is."""
    weight = sum(max(1, int(work)) for *_, work in shards)
    if not weight:
        return 0.0
    done = 0.0
    for state, units_done, units_total, work in shards:
        own = 1.0 if state == ShardState.done.value else (units_done / units_total if units_total else 0.0)
        done += min(1.0, own) * max(1, int(work))
    return done / weight


def commit(session: Session, job_id: str, index: int, token: str, result_key: str, compute_seconds: float) -> bool:
    """running -> done with this run's partial grid; False when another run committed first,
    the shard was re-queued, or the job is no longer running (canceled, failed, deleted)."""
    if not _job_running(session, job_id):
        return False
    result = session.execute(
        update(JobShard)
        .where(_held(job_id, index, token))
        .values(
            state=ShardState.done.value,
            token=token,
            result_key=result_key,
            finished_at=utcnow(),
            units_done=JobShard.units_total,
            compute_seconds=compute_seconds,
        )
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def set_winner_worker(session: Session, job_id: str, index: int, token: str, worker: str) -> None:
    """A backup that won records its own worker as the shard's."""
    session.execute(
        update(JobShard)
        .where(JobShard.job_id == job_id, JobShard.shard_index == index, JobShard.token == token)
        .values(worker=worker[:200])
        .execution_options(synchronize_session=False)
    )


def fail(session: Session, job_id: str, index: int, token: str) -> None:
    session.execute(
        update(JobShard)
        .where(_held(job_id, index, token))
        .values(state=ShardState.failed.value, finished_at=utcnow())
        .execution_options(synchronize_session=False)
    )


def elect_assembler(session: Session, job_id: str, token: str) -> str | None:
    """Make `token` the job's assembler if every shard is done and nobody was elected; returns
    the job's claim token (the assembler commits the job with it), else None. One UPDATE: of
    any number of shards committing at once, exactly one gets the job."""
    undone = exists().where(JobShard.job_id == job_id, JobShard.state != ShardState.done.value)
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == _RUNNING, Job.assembler.is_(None), Job.shards_total > 0, ~undone)
        .values(assembler=token, phase=JobPhase.writing.value, heartbeat_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        return None
    return session.scalar(select(Job.claim_token).where(Job.id == job_id))


# --- reconciliation ----------------------------------------------------------------------
def rescue_stale(session: Session, stale_after_s: float, max_attempts: int) -> tuple[list[tuple[str, int]], list[str]]:
    """Running shards of running jobs whose run stopped heart-beating: re-queued, or - once
    the shard used `max_attempts` - its job failed ``worker_lost``. Returns (re-queued shards,
    failed job ids)."""
    cutoff = utcnow() - timedelta(seconds=stale_after_s)
    stale = session.execute(
        select(JobShard.job_id, JobShard.shard_index, JobShard.attempts, JobShard.token)
        .join(Job, Job.id == JobShard.job_id)
        .where(JobShard.state == ShardState.running.value, JobShard.heartbeat_at < cutoff, Job.status == _RUNNING)
    ).all()
    requeued, failed = [], []
    for job_id, index, attempts, token in stale:
        same_run = and_(
            JobShard.job_id == job_id,
            JobShard.shard_index == index,
            JobShard.state == ShardState.running.value,
            JobShard.token == token,
            JobShard.heartbeat_at < cutoff,
        )
        if attempts >= max_attempts:
            failed_now = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == _RUNNING)
                .values(
                    status=JobStatus.failed.value,
                    finished_at=utcnow(),
                    error_code="worker_lost",
                    error_message=f"the worker running shard {index} of this job stopped responding "
                    f"on all {attempts} attempts",
                )
                .execution_options(synchronize_session=False)
            )
            if failed_now.rowcount == 1:
                failed.append(job_id)
            continue
        moved = session.execute(
            update(JobShard)
            .where(same_run)
            .values(state=ShardState.queued.value, token=None, backup_token=None, enqueued_at=None, worker=None)
            .execution_options(synchronize_session=False)
        )
        if moved.rowcount == 1:
            requeued.append((job_id, index))
    return requeued, failed


def to_send(session: Session, resend_after_s: float, grace_s: float = 2.0, limit: int = 500) -> list[tuple[str, int]]:
    """Queued shards of running jobs whose message may be missing (never sent: the planner
    died in between or the broker was down; or sent long ago: the broker lost it)."""
    now = utcnow()
    rows = session.execute(
        select(JobShard.job_id, JobShard.shard_index)
        .join(Job, Job.id == JobShard.job_id)
        .where(
            Job.status == _RUNNING,
            JobShard.state == ShardState.queued.value,
            or_(
                and_(JobShard.enqueued_at.is_(None), JobShard.created_at < now - timedelta(seconds=grace_s)),
                JobShard.enqueued_at < now - timedelta(seconds=resend_after_s),
            ),
        )
        .order_by(JobShard.created_at, JobShard.shard_index)
        .limit(limit)
    ).all()
    return [(job_id, int(index)) for job_id, index in rows]


def stragglers(session: Session, factor: float, min_seconds: float) -> list[tuple[str, int]]:
    """Shards worth a backup run: every other shard of the job is done, this one has run longer
    than `factor` times the median time the done ones took (and at least `min_seconds`), and
    it has no backup yet."""
    now = utcnow()
    candidates = session.execute(
        select(JobShard.job_id, JobShard.shard_index, JobShard.started_at)
        .join(Job, Job.id == JobShard.job_id)
        .where(
            Job.status == _RUNNING,
            Job.assembler.is_(None),
            JobShard.state == ShardState.running.value,
            JobShard.backup_token.is_(None),
            JobShard.backup_sent_at.is_(None),
        )
    ).all()
    found = []
    for job_id, index, started in candidates:
        shards = get_shards(session, job_id)
        others = [s for s in shards if s.shard_index != index]
        if not others or any(s.state != ShardState.done.value for s in others):
            continue
        took = [(s.finished_at - s.started_at).total_seconds() for s in others if s.finished_at and s.started_at]
        if not took or started is None:
            continue
        running_for = (now - started).total_seconds()
        if running_for > max(min_seconds, factor * statistics.median(took)):
            found.append((job_id, int(index)))
    return found


def summaries(session: Session, job_ids: Iterable[str]) -> dict[str, dict]:
    """``{job id: {count, done, workers, recomputed}}`` for the sharded ones among `job_ids`:
    what the job JSON and summary.json say about its shards. `recomputed`: shard runs beyond
    one per shard (a dead worker's shard run again, a straggler's backup)."""
    ids = list(job_ids)
    found: dict[str, dict] = {}
    for start in range(0, len(ids), 500):
        rows = session.execute(
            select(JobShard.job_id, JobShard.state, JobShard.worker, JobShard.attempts)
            .where(JobShard.job_id.in_(ids[start : start + 500]))
            .order_by(JobShard.job_id, JobShard.shard_index)
        ).all()
        for job_id, state, worker, attempts in rows:
            entry = found.setdefault(job_id, {"count": 0, "done": 0, "workers": [], "recomputed": 0})
            entry["count"] += 1
            entry["done"] += state == ShardState.done.value
            entry["recomputed"] += max(0, attempts - 1)
            if worker and worker not in entry["workers"]:
                entry["workers"].append(worker)
    return found
