"""The reconciler: makes sure no job is lost between the database and the broker.

Each pass (every RECONCILE_INTERVAL_S, in a thread of every worker's main process, or as
``python -m shared.jobs.reconcile`` from cron) does these things, all safe to run concurrently:

1. running jobs whose heartbeat is stale (their worker died) are re-queued, or failed once
   they used JOB_MAX_ATTEMPTS;
2. queued jobs never sent (the broker was down at submission) or sent long ago (the broker
   lost the message) are sent again;
3. finished jobs past RETENTION_HOURS are deleted with their files (the row first, then
   the files: a crash in between leaves files without a row, never the reverse);
4. the shards of sharded jobs: a shard whose worker died is re-queued (or its job failed
   once the shard used JOB_MAX_ATTEMPTS), a queued shard whose message may be missing is sent
   again, and a straggler gets a backup run (`reconcile_shards`, shared.jobs.shard_store);
5. the orphan sweep: upload and result folders of job ids that have no row, untouched for
   ORPHAN_GRACE_S, are removed. They are what a worker that died while storing results for
   a job deleted meanwhile leaves behind, or an API process that died between storing an
   upload and inserting its row. The grace period covers that normal window (the upload
   is stored before its row is inserted).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from shared.jobs import job_metrics, job_store, shard_store
from shared.jobs.database import session_scope
from shared.jobs.job_status import JobStatus
from shared.jobs.queue import send_job, send_shard
from shared.settings import Settings, get_settings
from shared.storage import Storage

log = logging.getLogger("heatmaps.reconcile")


@dataclass
class PassReport:
    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    sent: list[str] = field(default_factory=list)
    send_errors: int = 0
    deleted: list[str] = field(default_factory=list)
    swept: list[str] = field(default_factory=list)
    shards_requeued: list[tuple[str, int]] = field(default_factory=list)
    shards_sent: list[tuple[str, int]] = field(default_factory=list)
    backups_sent: list[tuple[str, int]] = field(default_factory=list)


def reconcile_once(settings: Settings, storage: Storage | None = None) -> PassReport:
    report = PassReport()
    url = settings.resolved_database_url
    with session_scope(url) as session:
        report.requeued, report.failed = job_store.rescue_stale(
            session, settings.stale_after_s, settings.job_max_attempts
        )
    for _ in report.failed:
        job_metrics.count_outcome(settings, JobStatus.failed)
    with session_scope(url) as session:
        to_send = list(
            dict.fromkeys(report.requeued + job_store.queued_to_send(session, settings.requeue_queued_after_s))
        )
    for job_id in to_send:
        try:
            send_job(settings, job_id)
        except Exception as exc:  # broker still down: try again next pass
            report.send_errors += 1
            log.warning("could not send job %s: %s", job_id, exc)
            break
        with session_scope(url) as session:
            job_store.mark_enqueued(session, job_id)
        report.sent.append(job_id)
    reconcile_shards(settings, report)
    storage = storage or Storage.from_settings(settings)
    report.deleted = expire_finished(settings, storage)
    report.swept = sweep_orphans(settings, storage)
    if report.requeued or report.failed or report.sent or report.deleted or report.swept or report.shards_sent:
        log.info(
            "reconcile: requeued=%d failed=%d sent=%d deleted=%d swept=%d shards requeued=%d sent=%d backups=%d",
            len(report.requeued),
            len(report.failed),
            len(report.sent),
            len(report.deleted),
            len(report.swept),
            len(report.shards_requeued),
            len(report.shards_sent),
            len(report.backups_sent),
        )
    return report


def reconcile_shards(settings: Settings, report: PassReport) -> None:
    """The shards of sharded jobs (shared.jobs.shard_store): re-queue those whose worker
    died (or fail their job once a shard used its attempts), send those whose message may
    be missing, and give a straggler a backup run."""
    url = settings.resolved_database_url
    with session_scope(url) as session:
        report.shards_requeued, failed = shard_store.rescue_stale(
            session, settings.stale_after_s, settings.job_max_attempts
        )
    report.failed.extend(failed)
    for _ in failed:
        job_metrics.count_outcome(settings, JobStatus.failed)
    with session_scope(url) as session:
        pending = list(
            dict.fromkeys(report.shards_requeued + shard_store.to_send(session, settings.requeue_queued_after_s))
        )
        backups = shard_store.stragglers(session, settings.straggler_factor, settings.straggler_min_s)
    for sent, shards, backup in ((report.shards_sent, pending, False), (report.backups_sent, backups, True)):
        for job_id, index in shards:
            try:
                send_shard(settings, job_id, index, backup)
            except Exception as exc:  # broker still down: try again next pass
                report.send_errors += 1
                log.warning("could not send shard %d of job %s: %s", index, job_id, exc)
                return
            with session_scope(url) as session:
                shard_store.mark_enqueued(session, job_id, index, backup)
            sent.append((job_id, index))


def expire_finished(settings: Settings, storage: Storage) -> list[str]:
    """Retention: each finished job past RETENTION_HOURS loses its row (committed first),
    then its files."""
    url = settings.resolved_database_url
    with session_scope(url) as session:
        expired = [job.id for job in job_store.expired(session, settings.retention_hours)]
    deleted = []
    for job_id in expired:
        with session_scope(url) as session:
            if not job_store.delete_finished(session, job_id):
                continue
        storage.delete_job_files(job_id)
        deleted.append(job_id)
    return deleted


def sweep_orphans(settings: Settings, storage: Storage) -> list[str]:
    """Remove the folders of job ids without a row, untouched for ORPHAN_GRACE_S."""
    folders = storage.job_folders()
    if not folders:
        return []
    with session_scope(settings.resolved_database_url) as session:
        known = job_store.existing_ids(session, sorted(folders))
    cutoff = time.time() - settings.orphan_grace_s
    swept = []
    for job_id, modified in sorted(folders.items()):
        if job_id in known or modified > cutoff:
            continue
        with session_scope(settings.resolved_database_url) as session:
            if job_store.existing_ids(session, [job_id]):  # inserted since the first look
                continue
        storage.delete_job_files(job_id)
        swept.append(job_id)
        log.warning("removed the files of job %s, which has no row (orphaned)", job_id)
    return swept


def run_forever(settings: Settings, stop: threading.Event) -> None:
    storage = Storage.from_settings(settings)
    while not stop.wait(settings.reconcile_interval_s):
        try:
            reconcile_once(settings, storage)
        except Exception:  # the database may be down; the next pass tries again
            log.exception("reconcile pass failed")


def start_thread(settings: Settings) -> threading.Event:
    stop = threading.Event()
    threading.Thread(target=run_forever, args=(settings, stop), name="reconciler", daemon=True).start()
    return stop


def main() -> int:
    logging.basicConfig(level=logging.INFO)
    settings = get_settings()
    while True:
        reconcile_once(settings)
        time.sleep(settings.reconcile_interval_s)


if __name__ == "__main__":
    raise SystemExit(main())
