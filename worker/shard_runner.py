"""One large job on many workers (issue 16): plan the shards, run one, assemble them.

1. **Plan** (the worker that claimed the job, ``worker.jobrunner``): the grid is cut into
   bands of output rows (``worker.inference.shard_bands``), one ``job_shards`` row each, and
   one Celery message per shard goes to the jobs' queue. The job row stays `running`; the
   planning worker is free at once (often for one of the shards).
2. **Run a shard** (any worker): claim the shard row (compare-and-set), compute its band
   with a heartbeat, store the partial grid under ``shards/<job_id>/`` (named by the run's
   token), commit the row `done`. A run that finds the shard taken, done or its job stopped
   removes its own file.
3. **Assemble** (exactly one process: the shard run whose commit left no shard undone wins
   ``shard_store.elect_assembler``): read the partial grids, stack them into the job's grid,
   write the outputs as an unsharded job does, store and commit the job with its claim
   token; then the partial grids are removed.

Faults: a shard whose worker dies is re-queued by the reconciler (its heartbeat goes stale)
and only that shard runs again; a shard that fails on bad input fails the job once with that
reason, and the other shards stop at their next heartbeat; cancel and delete stop every
shard the same way. A job re-queued while assembling is planned again and keeps the shards
already done.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import time
from pathlib import Path

import numpy as np
from sqlalchemy.exc import DBAPIError, OperationalError

from shared.image_sources.source_types import ImageError
from shared.jobs import job_metrics, job_store, shard_store
from shared.jobs.database import session_scope
from shared.jobs.job_status import JobPhase, JobStatus, ShardState
from shared.jobs.queue import send_shard
from shared.jobspec import JobParams
from shared.storage import shard_key, shard_prefix
from worker.engine import OpenJob, compute_shard, write_results
from worker.inference.shard_bands import Band, assemble, auto_shard_count, part_arrays, part_from_arrays, plan_bands
from worker.job_context import (
    RERAISE,
    BeatThread,
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

log = logging.getLogger("heatmaps.worker")

#: Steps of a shard run at which `WorkerContext.checkpoint` is called (with the job id), for
#: tests that interleave a cancel, a delete or a worker death with them.
PLANNED, SHARD_CLAIMED, SHARD_COMPUTED, SHARD_STORED, SHARD_COMMITTED = (
    "planned",
    "shard_claimed",
    "shard_computed",
    "shard_stored",
    "shard_committed",
)


def plan_shards(job: OpenJob, shards_max: int, workers: int) -> list[Band]:
    """The job's bands when it is to be sharded, else []: its `shards` parameter, or for
    `auto` as many as there are live `workers` (at most `shards_max`) when the job is large
    enough to pay for it (``shard_bands.auto_shard_count``). More shards than workers would only
    add seams: a shard's band is recomputed at its edges, and the extra shards wait anyway."""
    requested = job.params.shards
    if requested == 1 or (requested is None and workers < 2):
        return []
    geometry = job.geometry()
    computed = job.computed(geometry)
    if requested is None:
        count = auto_shard_count(geometry, computed, min(shards_max, workers))
    else:
        count = min(requested, shards_max)
    if count <= 1:
        return []
    return plan_bands(geometry, count, computed)


def start_shards(
    job_id: str, token: str, bands: list[Band], job: OpenJob, context: WorkerContext, heartbeat: Heartbeat, workdir
) -> JobStatus:
    """Record the bands and queue their shards; the job stays `running`. A re-planned job whose
    shards are all done already is assembled here and now."""
    settings = context.settings
    rows = [shard_store.BandRows(b.row_start, b.row_stop, b.work) for b in bands]

    def _create():
        with session_scope(settings.resolved_database_url) as session:
            return shard_store.create_shards(session, job_id, token, rows)

    pending = with_retries(settings, _create, "plan shards")
    if pending is None:
        raise JobCanceled(job_id)
    context.checkpoint(PLANNED, job_id)
    if not pending:
        log.info("job %s: every shard is done already; assembling", job_id)
        if _elect(context, job_id, token) is None:
            return JobStatus.running
        return _assemble(job_id, token, context, heartbeat, workdir, job)
    _send(context, job_id, pending)
    log.info("job %s: %d shards queued (%d planned)", job_id, len(pending), len(bands))
    return JobStatus.running


def _send(context: WorkerContext, job_id: str, indices: list[int]) -> None:
    """Publish the shards; one the broker refuses stays queued for the reconciler to send."""
    settings = context.settings
    for index in indices:
        try:
            send_shard(settings, job_id, index)
        except Exception as exc:
            log.warning("shard %d of job %s not sent yet (%s); the reconciler will", index, job_id, exc)
            return
        with session_scope(settings.resolved_database_url) as session:
            shard_store.mark_enqueued(session, job_id, index)


def _elect(context: WorkerContext, job_id: str, token: str) -> str | None:
    def _try():
        with session_scope(context.settings.resolved_database_url) as session:
            return shard_store.elect_assembler(session, job_id, token)

    return with_retries(context.settings, _try, "elect the assembler")


class ShardHeartbeat(BeatThread):
    """A shard run's heartbeat and progress (and the job's, summed over its shards); notices
    when the shard was taken away (re-queued, a backup committed first) or the job stopped."""

    what = "shard"

    def __init__(self, context: WorkerContext, job_id: str, index: int, token: str):
        super().__init__(context, job_id, f"heartbeat-{job_id}-{index}")
        self.index, self.token = index, token

    def progress(self, done: int, total: int) -> None:
        self.done, self.total = done, total
        self._check_held()

    def beat(self) -> None:
        with session_scope(self.context.settings.resolved_database_url) as session:
            if not shard_store.heartbeat(session, self.job_id, self.index, self.token, self.done, self.total):
                self.lost.set()


def execute_shard(job_id: str, index: int, context: WorkerContext, backup: bool = False) -> ShardState | None:
    """Run shard `index` of the job if it is queued (or, as a `backup`, a second run of a
    straggler); returns how it ended for this run (None: nothing to run, "lost": stopped)."""
    settings = context.settings
    url = settings.resolved_database_url

    def _claim():
        with session_scope(url) as session:
            return shard_store.claim(session, job_id, index, context.name, backup)

    token = with_retries(settings, _claim, "claim shard")
    if token is None:
        log.info("shard %d of job %s has nothing to run; duplicate delivery ignored", index, job_id)
        return None
    context.checkpoint(SHARD_CLAIMED, job_id)
    workdir = make_scratch_dir(job_id, settings.resolved_scratch_dir)
    outcome: str = "lost"
    try:
        with ShardHeartbeat(context, job_id, index, token) as heartbeat:
            outcome, job_token = _run_guarded(job_id, index, token, context, heartbeat, workdir, backup)
        if job_token is not None:  # this run committed the last shard: it assembles the job
            with Heartbeat(context, job_id, job_token) as job_heartbeat:
                _assemble_guarded(job_id, job_token, context, job_heartbeat, workdir)
        return outcome
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        job_metrics.count_shard(settings, str(outcome))


def _job_facts(context: WorkerContext, job_id: str, index: int):
    """(job params, image key, job claim token, shard row) as the database has them now."""
    with session_scope(context.settings.resolved_database_url) as session:
        job = job_store.get_job(session, job_id)
        shard = next((s for s in shard_store.get_shards(session, job_id) if s.shard_index == index), None)
        if job is None or shard is None:
            raise JobCanceled(job_id)
        return JobParams.from_json(job.params), job.image_key, job.claim_token, shard


def _run_guarded(job_id, index, token, context, heartbeat, workdir, backup) -> tuple[str, str | None]:
    """Compute, store and commit the shard; turn every failure into a failed job (bad input,
    internal errors) - once, however many shards fail - and a lost run into nothing."""
    key = shard_key(job_id, index, token)
    job_token = None
    try:
        params, image_key, job_token, shard = _job_facts(context, job_id, index)
        return _compute_and_commit(job_id, shard, token, key, params, image_key, context, heartbeat, workdir, backup)
    except JobCanceled:
        log.info("shard %d of job %s was taken away or its job stopped; stopped", index, job_id)
        _discard(context, key)
        return "lost", None
    except (OperationalError, DBAPIError):
        raise  # database gone: the shard's heartbeat goes stale and the reconciler re-queues it
    except Exception as exc:
        code, message = describe_failure(exc)
        if code == "internal_error":
            log.exception("shard %d of job %s crashed", index, job_id)
        if isinstance(exc, ImageError):
            discard_unreadable_upload(context, job_id)
        _discard(context, key)
        with session_scope(context.settings.resolved_database_url) as session:
            shard_store.fail(session, job_id, index, token)
        if job_token is not None and record_failure(context, job_id, job_token, code, message):
            job_metrics.observe_job_end(context.settings, job_id, job_token)
            _discard(context, shard_prefix(job_id))  # the other shards' partial grids are of no use now
        if isinstance(exc, RERAISE):
            raise
        return ShardState.failed.value, None


def _compute_and_commit(job_id, shard, token, key, params, image_key, context, heartbeat, workdir, backup):
    settings, storage = context.settings, context.storage
    clock = time.perf_counter()
    with open_input(context, job_id, params, image_key, workdir) as job:
        geometry = job.geometry()
        part = compute_shard(job, geometry, _band(geometry, shard), heartbeat.progress)
    seconds = time.perf_counter() - clock
    context.checkpoint(SHARD_COMPUTED, job_id)
    heartbeat.confirm_held()
    local = workdir / "part"  # a scratch file; its storage key is shard_key's
    with open(local, "wb") as handle:
        np.savez(handle, **part_arrays(part))
    try:
        with_retries(settings, lambda: storage.put_file(key, local), "store the shard's grid")
    except BaseException:
        _discard(context, key)
        raise
    context.checkpoint(SHARD_STORED, job_id)

    def _commit():
        with session_scope(settings.resolved_database_url) as session:
            committed = shard_store.commit(session, job_id, shard.shard_index, token, key, seconds)
            if committed and backup:
                shard_store.set_winner_worker(session, job_id, shard.shard_index, token, context.name)
            return committed

    if not with_retries(settings, _commit, "commit the shard"):
        raise JobCanceled(job_id)  # another run committed first, or the job stopped: drop this file
    context.checkpoint(SHARD_COMMITTED, job_id)
    log.info("shard %d of job %s done in %.1fs", shard.shard_index, job_id, seconds)
    return ShardState.done.value, _elect(context, job_id, token)


def _band(geometry, shard) -> Band:
    """A shard row's band, its strip computed again from the job's geometry (the row keeps rows only)."""
    return Band(
        shard.shard_index, shard.row_start, shard.row_stop, *geometry.strip(shard.row_start, shard.row_stop), shard.work
    )


def _discard(context: WorkerContext, key: str) -> None:
    try:
        with_retries(context.settings, lambda: context.storage.delete_prefix(key), "remove a partial grid")
    except Exception as exc:  # the orphan sweep or the job's deletion removes it later
        log.warning("could not remove %s: %s", key, exc)


def _assemble_guarded(job_id: str, job_token: str, context: WorkerContext, heartbeat: Heartbeat, workdir) -> JobStatus:
    """Assemble and commit the job; a failure fails the job as an unsharded one would."""
    try:
        return _assemble(job_id, job_token, context, heartbeat, workdir)
    except JobCanceled:
        log.info("job %s was canceled or taken over while assembling; stopped", job_id)
        return JobStatus.canceled
    except (OperationalError, DBAPIError):
        raise  # the job's heartbeat goes stale; re-queued, it is planned again and assembles
    except Exception as exc:
        code, message = describe_failure(exc)
        if code == "internal_error":
            log.exception("assembling job %s crashed", job_id)
        record_failure(context, job_id, job_token, code, message)
        if isinstance(exc, RERAISE):
            raise
        return JobStatus.failed
    finally:
        try:
            job_metrics.observe_job_end(context.settings, job_id, job_token)
        except Exception as exc:
            log.warning("metrics for job %s not counted: %s", job_id, exc)


def _assemble(job_id: str, job_token: str, context: WorkerContext, heartbeat: Heartbeat, workdir, job=None):
    """Stack the shards' grids, write the outputs, store and commit (`job`: the input, when
    the caller has it open already)."""
    settings = context.settings
    heartbeat.enter(JobPhase.writing, 0.0)
    with session_scope(settings.resolved_database_url) as session:
        record = job_store.get_job(session, job_id)
        shards = shard_store.get_shards(session, job_id)
        info = shard_store.summaries(session, [job_id]).get(job_id)
    if record is None or not shards or any(s.state != ShardState.done.value for s in shards):
        raise JobCanceled(job_id)
    parts = [part_from_arrays(_load_part(context, s.result_key, workdir)) for s in shards]
    params = JobParams.from_json(record.params)
    out_dir = Path(workdir) / "out"
    with _opened(job, context, job_id, params, record.image_key, workdir) as opened:
        geometry = opened.geometry()
        bands = [_band(geometry, s) for s in shards]
        grid = assemble(geometry, parts, bands, masked=opened.keep is not None)
        starts = [s.started_at for s in shards if s.started_at]
        ends = [s.finished_at for s in shards if s.finished_at]
        opened.timings["inference_s"] = (max(ends) - min(starts)).total_seconds() if starts and ends else 0.0
        opened.timings["shard_compute_s"] = sum(s.compute_seconds or 0.0 for s in shards)
        summary = write_results(opened, grid, out_dir, viewer=True, phase=heartbeat.enter, extra={"shards": info})
    status = store_and_commit(job_id, job_token, summary, out_dir, context, heartbeat)
    if status == JobStatus.succeeded:
        _discard(context, shard_prefix(job_id))
    return status


def _opened(job, context: WorkerContext, job_id: str, params: JobParams, image_key: str, workdir):
    """The job's input: `job` as given, or opened again (a shard's worker assembling)."""
    if job is not None:
        return contextlib.nullcontext(job)
    return open_input(context, job_id, params, image_key, Path(workdir))


def _load_part(context: WorkerContext, key: str, workdir) -> dict:
    """A shard's stored partial grid, as arrays."""
    data = with_retries(context.settings, lambda: b"".join(context.storage.iter_chunks(key)), "read a partial grid")
    with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
        return {name: arrays[name] for name in arrays.files}
