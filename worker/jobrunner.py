"""Running one job from its row: claim, heartbeat, compute, store, commit.

Idempotent: a duplicate delivery finds the row not `queued` and does nothing. Artifacts go
to ``results/<job_id>/`` (each file written under a temporary name and renamed), and only
then is the row committed `succeeded` - by the holder of the claim token alone. Bad input
fails at once; database and storage faults are retried a bounded number of times.
"""

from __future__ import annotations

import logging
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from sqlalchemy.exc import DBAPIError, OperationalError

from shared import job_store
from shared.database import session_scope
from shared.exceptions import InputError
from shared.imageio import ImageError
from shared.jobspec import JobParams
from shared.settings import Settings
from shared.storage import Storage, StorageError
from worker.engine import run_inference
from worker.model_registry import ModelRegistry, ModelUnavailableError

log = logging.getLogger("heatmaps.worker")
T = TypeVar("T")


class JobCanceled(Exception):
    """The row says this worker no longer holds the job (canceled, or re-queued elsewhere)."""


@dataclass
class WorkerContext:
    settings: Settings
    storage: Storage
    registry: ModelRegistry
    name: str = socket.gethostname()


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


class Heartbeat:
    """Background thread: writes progress and the heartbeat; notices a cancel or takeover."""

    def __init__(self, context: WorkerContext, job_id: str, token: str):
        self.context, self.job_id, self.token = context, job_id, token
        self.done, self.total = 0, 0
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def progress(self, done: int, total: int) -> None:
        """Engine callback between tiles: record progress, stop if the job was taken away."""
        self.done, self.total = done, total
        if self.lost.is_set():
            raise JobCanceled(self.job_id)

    def beat(self) -> None:
        url = self.context.settings.resolved_database_url
        with session_scope(url) as session:
            if not job_store.heartbeat(session, self.job_id, self.token, self.done, self.total):
                self.lost.set()

    def _run(self) -> None:
        while not self._stop.wait(self.context.settings.heartbeat_interval_s):
            try:
                self.beat()
            except Exception as exc:  # database hiccup: the next beat tries again
                log.warning("heartbeat for %s failed: %s", self.job_id, exc)


def execute(job_id: str, context: WorkerContext) -> str:
    """Run the job if it is queued; returns what happened (for logs and tests)."""
    settings = context.settings
    url = settings.resolved_database_url

    def _claim():
        with session_scope(url) as session:
            return job_store.claim(session, job_id, context.name)

    token = with_retries(settings, _claim, "claim")
    if token is None:
        log.info("job %s is not queued; duplicate delivery ignored", job_id)
        return "skipped"
    with session_scope(url) as session:
        job = job_store.get_job(session, job_id)
        image_key, raw_params = job.image_key, job.params
    workdir = Path(tempfile.mkdtemp(prefix=f"job-{job_id}-"))
    outcome = "failed"
    try:
        with Heartbeat(context, job_id, token) as heartbeat:
            try:
                outcome = _run(job_id, token, image_key, raw_params, context, heartbeat, workdir)
            except JobCanceled:
                outcome = "canceled"
                log.info("job %s was canceled or taken over; stopped", job_id)
            except InputError as exc:
                _fail(context, job_id, token, exc.code, exc.message)
                if isinstance(exc, ImageError):  # an unreadable upload is of no further use
                    context.storage.delete_prefix(f"uploads/{job_id}")
            except ModelUnavailableError as exc:
                _fail(context, job_id, token, exc.code, str(exc))
            except StorageError as exc:
                _fail(context, job_id, token, "storage_error", str(exc))
            except OSError as exc:  # the worker's scratch space is full or failing
                _fail(context, job_id, token, "storage_error", f"could not write results: {exc}")
            except MemoryError:
                _fail(
                    context,
                    job_id,
                    token,
                    "out_of_memory",
                    "the image needs more memory than this worker has; lower memory_budget_mb or use a larger worker",
                )
            except ValueError as exc:
                _fail(context, job_id, token, "invalid_input", str(exc))
            except Exception as exc:
                if type(exc).__name__ in ("SoftTimeLimitExceeded", "TimeLimitExceeded"):
                    _fail(context, job_id, token, "time_limit", "the job ran past the configured time limit")
                    raise
                if isinstance(exc, (OperationalError, DBAPIError)):
                    raise  # database gone: the reconciler re-queues the job when it is back
                log.exception("job %s crashed", job_id)
                _fail(context, job_id, token, "internal_error", f"{type(exc).__name__}: {exc}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return outcome


def _fail(context: WorkerContext, job_id: str, token: str, code: str, message: str) -> None:
    def _write():
        with session_scope(context.settings.resolved_database_url) as session:
            return job_store.finish_failed(session, job_id, token, code, message)

    with_retries(context.settings, _write, "record failure")
    log.info("job %s failed: %s: %s", job_id, code, message)


def _run(
    job_id: str,
    token: str,
    image_key: str,
    raw_params: dict,
    context: WorkerContext,
    heartbeat: Heartbeat,
    workdir: Path,
) -> str:
    settings, storage = context.settings, context.storage
    params = JobParams.from_json(raw_params)
    image_path = storage.local_path(image_key)
    if image_path is None:
        image_path = with_retries(settings, lambda: storage.fetch_to(image_key, workdir / "image"), "download")
    out_dir = workdir / "out"
    summary = run_inference(
        image_path, params, context.registry, out_dir, max_pixels=settings.max_image_pixels, progress=heartbeat.progress
    )
    heartbeat.progress(heartbeat.total, heartbeat.total)  # last chance to notice a cancel before storing

    prefix = f"results/{job_id}"
    with_retries(settings, lambda: storage.put_dir(prefix, out_dir), "store artifacts")
    result = {
        "summary": summary,
        "artifacts": {
            "heatmap": f"{prefix}/heatmap.npz",
            "summary": f"{prefix}/summary.json",
            "overlays": {c["name"]: f"{prefix}/{c['overlay']}" for c in summary["classes"]},
        },
    }

    def _commit():
        with session_scope(settings.resolved_database_url) as session:
            return job_store.finish_succeeded(session, job_id, token, result, summary["timings"]["inference_s"])

    if with_retries(settings, _commit, "commit result"):
        log.info("job %s succeeded", job_id)
        return "succeeded"
    # Canceled while storing, or re-queued to another worker: keep the row's truth.
    with session_scope(settings.resolved_database_url) as session:
        job = job_store.get_job(session, job_id)
        if job is not None and job.status == "canceled":
            storage.delete_prefix(prefix)
    return "canceled"
