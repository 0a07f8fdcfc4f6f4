"""Running one job from its row: claim, heartbeat, compute, store, commit.

Idempotent: a duplicate delivery finds the row not `queued` and does nothing. Artifacts go
to ``results/<job_id>/`` (each file written under a temporary name and renamed), and only
then is the row committed `succeeded` - by the holder of the claim token alone. Bad input
fails at once; database and storage faults are retried a bounded number of times
(``worker.job_context`` holds what a job, a shard and an assembly share).

A large job is planned here and handed to shards (``worker.shard_runner``): the job row
stays `running` and this worker is free for the next message - one of its shards, say.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from sqlalchemy.exc import DBAPIError, OperationalError

from shared.image_sources.source_types import ImageError
from shared.jobs import job_metrics, job_store
from shared.jobs.database import session_scope
from shared.jobs.job_status import JobStatus
from shared.jobs.queue import live_workers
from shared.jobspec import JobParams
from shared.settings import Settings
from worker.engine import infer, write_results
from worker.job_context import (
    CLAIMED,
    RERAISE,
    Heartbeat,
    JobCanceled,
    WorkerContext,
    describe_failure,
    discard_unreadable_upload,
    open_input,
    record_failure,
    store_and_commit,
    with_retries,
)
from worker.scratch import make_scratch_dir
from worker.shard_runner import plan_shards, start_shards

log = logging.getLogger("heatmaps.worker")


def execute(job_id: str, context: WorkerContext) -> JobStatus | None:
    """Run the job if it is queued; returns its final status as this worker saw it (for
    logs and tests), or None when the delivery was a duplicate and nothing ran."""
    settings = context.settings
    url = settings.resolved_database_url

    def _claim():
        with session_scope(url) as session:
            return job_store.claim(session, job_id, context.name)

    token = with_retries(settings, _claim, "claim")
    if token is None:
        log.info("job %s is not queued; duplicate delivery ignored", job_id)
        return None
    context.checkpoint(CLAIMED, job_id)
    with session_scope(url) as session:
        job = job_store.get_job(session, job_id)
        if job is None:  # canceled and deleted right after the claim
            log.info("job %s was deleted as it started; nothing to do", job_id)
            return JobStatus.canceled
        image_key, raw_params = job.image_key, job.params
    workdir = make_scratch_dir(job_id, settings.resolved_scratch_dir)
    try:
        with Heartbeat(context, job_id, token) as heartbeat:
            return _run_guarded(job_id, token, image_key, raw_params, context, heartbeat, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        _count_outcome(settings, job_id, token)


def _count_outcome(settings: Settings, job_id: str, token: str) -> None:
    """Prometheus counters (shared.jobs.job_metrics); counting never fails a job."""
    try:
        job_metrics.observe_job_end(settings, job_id, token)
    except Exception as exc:
        log.warning("metrics for job %s not counted: %s", job_id, exc)


def _run_guarded(
    job_id: str,
    token: str,
    image_key: str,
    raw_params: dict,
    context: WorkerContext,
    heartbeat: Heartbeat,
    workdir: Path,
) -> JobStatus:
    """Compute and store the job; turn every failure into a failed row (see FAILURES)."""
    try:
        return _compute_and_store(job_id, token, image_key, raw_params, context, heartbeat, workdir)
    except JobCanceled:
        log.info("job %s was canceled or taken over; stopped", job_id)
        return JobStatus.canceled
    except (OperationalError, DBAPIError):
        raise  # database gone: the reconciler re-queues the job when it is back
    except Exception as exc:
        code, message = describe_failure(exc)
        if code == "internal_error":
            log.exception("job %s crashed", job_id)
        if isinstance(exc, ImageError):
            discard_unreadable_upload(context, job_id)
        record_failure(context, job_id, token, code, message)
        if isinstance(exc, RERAISE):
            raise
        return JobStatus.failed


def _compute_and_store(
    job_id: str,
    token: str,
    image_key: str,
    raw_params: dict,
    context: WorkerContext,
    heartbeat: Heartbeat,
    workdir: Path,
) -> JobStatus:
    """Open the input; a job large enough is handed to shards (its status stays `running`),
    any other is computed, written, stored and committed here."""
    settings = context.settings
    params = JobParams.from_json(raw_params)
    out_dir = workdir / "out"
    with open_input(context, job_id, params, image_key, workdir, heartbeat.enter) as job:
        bands = plan_shards(job, settings.shards_max, live_workers(settings) if job.params.shards is None else 0)
        if len(bands) > 1:
            return start_shards(job_id, token, bands, job, context, heartbeat, workdir)
        grid, extra = infer(job, heartbeat.progress, heartbeat.enter)
        summary = write_results(job, grid, out_dir, viewer=True, phase=heartbeat.enter, extra=extra)
    return store_and_commit(job_id, token, summary, out_dir, context, heartbeat)
