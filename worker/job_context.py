"""What every piece of work a worker runs shares - a whole job, a shard of one, the assembly
of shards: the worker's context, retries of transient faults, the heartbeat that notices a
cancel, how failures are described and recorded, where the input is read from, and storing
and committing the outputs.

Files and rows agree (issue 11): right before storing, the worker checks the row itself
(not only through the periodic heartbeat); a store that fails half-way removes what it
wrote; and when the commit finds the job no longer held - canceled, failed, or its row
deleted by the client or by retention meanwhile - the worker removes the results it stored,
unless the row names another attempt that owns them. What a dying worker leaves behind is
removed by the reconciler's orphan sweep (`shared.jobs.reconcile`).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from sqlalchemy.exc import DBAPIError, OperationalError

from shared.error_text import public_message
from shared.exceptions import InputError
from shared.input_urls import open_location
from shared.jobs import job_store
from shared.jobs.database import session_scope
from shared.jobs.job_status import JobPhase, JobStatus
from shared.jobspec import JobParams
from shared.settings import Settings
from shared.storage import Storage, StorageError, artifact_keys, mask_key, results_prefix, upload_prefix
from worker.engine import OpenJob, open_job
from worker.inference.model_registry import ModelRegistry, ModelUnavailableError

log = logging.getLogger("heatmaps.worker")
T = TypeVar("T")


class JobCanceled(Exception):
    """The row says this worker no longer holds the job (canceled, or re-queued elsewhere)."""


#: The steps of a job at which `WorkerContext.checkpoint` is called, in order.
CLAIMED, COMPUTED, STORED, COMMITTED = "claimed", "computed", "stored", "committed"


def _no_checkpoint(step: str, job_id: str) -> None:
    return None


@dataclass
class WorkerContext:
    settings: Settings
    storage: Storage
    registry: ModelRegistry
    name: str = socket.gethostname()
    #: Called as ``checkpoint(step, job_id)`` after each step (and with a JobPhase once each
    #: phase is recorded); tests use it to interleave a cancel, a delete, retention or a
    #: worker death deterministically with the job's steps.
    checkpoint: Callable[[str, str], None] = _no_checkpoint


def with_retries(settings: Settings, action: Callable[[], T], what: str) -> T:
    """Retry transient database/storage faults with exponential backoff, then give up."""
    delay = 0.5
    for attempt in range(settings.transient_retries + 1):
        try:
            return action()
        except (OperationalError, DBAPIError, StorageError, OSError) as exc:
            if attempt == settings.transient_retries:
                raise
            log.warning("%s failed (%s); retry %d in %.1fs", what, exc, attempt + 1, delay)
            time.sleep(delay)
            delay = min(delay * 2, 8.0)
    raise AssertionError("unreachable")


class BeatThread:
    """A background thread that calls `beat` every HEARTBEAT_INTERVAL_S while its block runs;
    `beat` sets `lost` when the row says this run no longer holds its work (canceled,
    re-queued, taken by another run), and the next check raises JobCanceled."""

    what = "work"

    def __init__(self, context: WorkerContext, job_id: str, name: str):
        self.context, self.job_id = context, job_id
        self.done, self.total = 0, 0
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def beat(self) -> None:
        raise NotImplementedError

    def _check_held(self) -> None:
        if self.lost.is_set():
            raise JobCanceled(self.job_id)

    def confirm_held(self) -> None:
        """Ask the row now (not at the next beat) whether this run still holds its work;
        raises JobCanceled when not. Called right before storing results."""
        with_retries(self.context.settings, self.beat, f"check the {self.what} before storing")
        self._check_held()

    def _loop(self) -> None:
        while not self._stop.wait(self.context.settings.heartbeat_interval_s):
            try:
                self.beat()
            except Exception as exc:  # database hiccup: the next beat tries again
                log.warning("heartbeat of the %s of %s failed: %s", self.what, self.job_id, exc)


class Heartbeat(BeatThread):
    """A job's heartbeat: writes its progress and phase; notices a cancel or takeover."""

    what = "job"

    def __init__(self, context: WorkerContext, job_id: str, token: str):
        super().__init__(context, job_id, f"heartbeat-{job_id}")
        self.token = token
        self.phase, self.fraction = JobPhase.reading, 0.0  # as the claim recorded it

    def progress(self, done: int, total: int) -> None:
        """Engine callback between tiles: record progress, stop if the job was taken away."""
        self.done, self.total = done, total
        self.phase, self.fraction = JobPhase.inference, (done / total if total else 0.0)
        self._check_held()

    def enter(self, phase: JobPhase, fraction: float = 0.0) -> None:
        """Engine/runner callback as the job moves on. A new phase is recorded at once (a few
        row writes per job), so that the job JSON says what the job does; the fraction within
        it goes with the next periodic beat."""
        changed = phase != self.phase
        self.phase, self.fraction = phase, fraction
        if changed:
            try:
                self.beat()
            except Exception as exc:  # as in the loop: the next beat tries again
                log.warning("phase of %s not recorded: %s", self.job_id, exc)
            self.context.checkpoint(phase, self.job_id)
        self._check_held()

    def beat(self) -> None:
        url = self.context.settings.resolved_database_url
        with session_scope(url) as session:
            held = job_store.heartbeat(
                session, self.job_id, self.token, self.done, self.total, self.phase, self.fraction
            )
            if not held:
                self.lost.set()


OUT_OF_MEMORY = "the image needs more memory than this worker has; lower memory_budget_mb or use a larger worker"
TIME_LIMIT = "the job ran past the configured time limit"

#: How a job failure is reported: the first row whose exception type matches gives the
#: error code and message. Order matters (InputError is a ValueError; StorageError before
#: OSError). Database errors are absent on purpose: they propagate, and the reconciler
#: re-queues the job once the database is back.
FAILURES: tuple[tuple[type[BaseException], Callable[[BaseException], tuple[str, str]]], ...] = (
    (InputError, lambda e: (e.code, e.message)),
    (ModelUnavailableError, lambda e: (e.code, str(e))),
    (StorageError, lambda e: ("storage_error", str(e))),
    (OSError, lambda e: ("storage_error", f"could not write results: {e}")),  # scratch space full or failing
    (MemoryError, lambda e: ("out_of_memory", OUT_OF_MEMORY)),
    (SoftTimeLimitExceeded, lambda e: ("time_limit", TIME_LIMIT)),
    (TimeLimitExceeded, lambda e: ("time_limit", TIME_LIMIT)),
    (ValueError, lambda e: ("invalid_input", str(e))),
)
#: Failures that are recorded and then re-raised, for Celery to act on.
RERAISE = (SoftTimeLimitExceeded, TimeLimitExceeded)


def describe_failure(exc: BaseException) -> tuple[str, str]:
    """(error code, message) for a job that raised `exc`; unknown errors are internal."""
    for kind, describe in FAILURES:
        if isinstance(exc, kind):
            return describe(exc)
    return "internal_error", f"{type(exc).__name__}: {exc}"


def discard_unreadable_upload(context: WorkerContext, job_id: str) -> None:
    """An unreadable upload is of no further use: removed *before* the row says `failed`, so
    that a client who sees the failure never finds the upload still there (issue 20). A
    removal that fails leaves it to the orphan sweep; the failure is recorded all the same."""
    try:
        context.storage.delete_prefix(upload_prefix(job_id))
    except Exception as exc:
        log.warning("upload of failed job %s not removed yet: %s", job_id, exc)


def record_failure(context: WorkerContext, job_id: str, token: str | None, code: str, message: str) -> bool:
    """Record the failure (False: the row had already ended, or another attempt holds it);
    the row gets the public form of the message (capped, no server paths: clients read it),
    the worker's log the full one."""

    def _write():
        with session_scope(context.settings.resolved_database_url) as session:
            return job_store.finish_failed(session, job_id, token, code, public_message(message))

    recorded = with_retries(context.settings, _write, "record failure")
    log.info("job %s failed: %s: %s", job_id, code, message)
    return recorded


def input_path(context: WorkerContext, key: str, local: Path):
    """A local path of a stored input (fetched to the scratch folder when storage is remote);
    InputError `input_gone` when it no longer exists (deleted by retention meanwhile)."""
    path = context.storage.local_path(key)
    if path is not None:
        if not path.is_file():
            raise InputError("input_gone", "the job's upload no longer exists; submit the image again")
        return path
    try:
        return with_retries(context.settings, lambda: context.storage.fetch_to(key, local), "download")
    except FileNotFoundError:
        raise InputError("input_gone", "the job's upload no longer exists; submit the image again") from None


def image_location(context: WorkerContext, params: JobParams, image_key: str, workdir: Path):
    """What the engine opens: an image_url checked again now (links resolved against the
    prefixes, `input_gone` when it vanished: shared.input_urls), or the stored upload."""
    if params.image_url:
        return open_location(params.image_url, context.settings.input_url_prefixes)
    return input_path(context, image_key, workdir / "image")


def open_input(
    context: WorkerContext, job_id: str, params: JobParams, image_key: str, workdir: Path, phase=None
) -> AbstractContextManager[OpenJob]:
    """The job's input opened for the engine (``worker.engine.open_job``): the image (upload or
    ``image_url``) and the mask picture, with this worker's limits; `phase` is told as it reads."""
    settings = context.settings
    mask_path = input_path(context, mask_key(job_id), workdir / "mask") if params.mask == "image" else None
    return open_job(
        image_location(context, params, image_key, workdir),
        params,
        context.registry,
        max_pixels=settings.max_image_pixels,
        max_region_pixels=settings.max_region_pixels,
        mask_image=mask_path,
        **({} if phase is None else {"phase": phase}),
    )


def store_and_commit(
    job_id: str, token: str, summary: dict, out_dir: Path, context: WorkerContext, heartbeat: Heartbeat
) -> JobStatus:
    """Store the outputs under the job's results prefix and commit the row `succeeded` -
    only while `token` still holds the job (a job canceled or deleted meanwhile stores
    nothing, or has what it stored removed)."""
    settings, storage = context.settings, context.storage
    context.checkpoint(COMPUTED, job_id)
    heartbeat.confirm_held()  # a job canceled or deleted meanwhile stores nothing

    heartbeat.enter(JobPhase.storing)
    prefix = results_prefix(job_id)
    try:
        with_retries(settings, lambda: storage.put_dir(prefix, out_dir), "store artifacts")
    except BaseException:
        storage.delete_prefix(prefix)  # no half set of artifacts, whatever happens to the row
        raise
    context.checkpoint(STORED, job_id)
    classes = [(c["name"], c["index"]) for c in summary["classes"]]
    map_regions = bool(summary.get("regions", {}).get("map_file"))
    result = {"summary": summary, "artifacts": artifact_keys(job_id, classes, map_regions=map_regions)}

    def _commit():
        with session_scope(settings.resolved_database_url) as session:
            return job_store.finish_succeeded(session, job_id, token, result, summary["timings"]["inference_s"])

    if with_retries(settings, _commit, "commit result"):
        log.info("job %s succeeded", job_id)
        context.checkpoint(COMMITTED, job_id)
        return JobStatus.succeeded
    discard_unowned_results(context, job_id)
    return JobStatus.canceled


def discard_unowned_results(context: WorkerContext, job_id: str) -> None:
    """The commit found the job no longer held by this attempt. Its stored results stay
    only when the row names an attempt that owns them (re-queued or running elsewhere: that
    attempt overwrites and commits them; succeeded: they are that attempt's). A canceled or
    failed row, or no row at all (deleted by the client or by retention while storing),
    owns no results: remove them, or they would stay on disk forever."""
    with session_scope(context.settings.resolved_database_url) as session:
        job = job_store.get_job(session, job_id)
        status = job.status if job is not None else None
    if status in (JobStatus.queued, JobStatus.running, JobStatus.succeeded):
        log.info("job %s is %s elsewhere; its results stay", job_id, status)
        return
    with_retries(context.settings, lambda: context.storage.delete_prefix(results_prefix(job_id)), "discard results")
    log.info("job %s was %s while storing; its results were removed", job_id, status or "deleted")
