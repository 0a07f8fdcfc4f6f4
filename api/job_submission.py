"""Submitting a job: the one operation behind ``POST /api/v1/jobs``, apart from the view.

Order matters for cost and for correctness: cheap checks first (idempotency, parameters
against the catalogue, the image header), then the per-key limits, then the only steps that
write (store the upload, insert the row, send the id). Every failure either leaves nothing
behind or leaves a row the reconciler finishes (broker down: the row stays `queued`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import BinaryIO

from redis.exceptions import RedisError
from sqlalchemy.exc import IntegrityError

from api.context import ApiContext
from api.error_handlers import ApiError
from shared import job_store, ratelimit
from shared.database import session_scope
from shared.imageio import probe_image
from shared.jobspec import validate_params
from shared.queue import send_job
from shared.storage import StorageError, upload_key, upload_prefix
from shared.tables import Job, new_job_id
from shared.webhook_signing import check_destination

log = logging.getLogger("heatmaps.api")


@dataclass(frozen=True)
class Submission:
    """A parsed request: who asks, the form fields, the uploaded image (a seekable stream)."""

    owner: str
    form: Mapping[str, str]
    image: BinaryIO
    idempotency_key: str | None = None


@dataclass(frozen=True)
class Submitted:
    job: Job
    created: bool  # False: an earlier job with the same Idempotency-Key


def submit_job(ctx: ApiContext, submission: Submission) -> Submitted:
    """Validate, check limits, store the upload, insert the row and enqueue the job id.

    Raises `InputError` for bad input (mapped to 4xx by the error handlers) and `ApiError`
    for limits (429) and storage outages (503).
    """
    earlier = _earlier_job(ctx, submission)
    if earlier is not None:
        return Submitted(earlier, created=False)
    settings = ctx.settings
    info = ctx.catalog().get(submission.form.get("model") or settings.default_model)
    params = validate_params(
        submission.form,
        info,
        max_batch_size=settings.max_batch_size,
        max_top_k=settings.max_top_k,
        memory_budget_mb=settings.memory_budget_mb,
    )
    callback_url = submission.form.get("callback_url") or None
    if callback_url is not None:
        check_destination(callback_url, settings)  # 400 invalid_callback_url (SSRF guard)
    image = probe_image(submission.image, max_pixels=settings.max_image_pixels, min_size=info.input_size)
    _check_limits(ctx, submission.owner)

    job_id = new_job_id()
    key = upload_key(job_id, image.extension)
    submission.image.seek(0)
    try:
        size, digest = ctx.storage.put_stream(key, submission.image)
    except StorageError as exc:
        log.error("upload store failed: %s", exc)
        raise ApiError(
            503, "storage_unavailable", "could not store the upload; try again shortly", {"Retry-After": "5"}
        ) from None
    job = Job(
        id=job_id,
        owner=submission.owner,
        idempotency_key=submission.idempotency_key,
        model=info.name,
        mode=params.mode,
        params=params.to_json(),
        image_key=key,
        image_format=image.format,
        image_width=image.width,
        image_height=image.height,
        image_sha256=digest,
        image_bytes=size,
        callback_url=callback_url,
    )
    winner = _insert(ctx, job, submission)
    if winner is not None:
        return Submitted(winner, created=False)
    _enqueue(ctx, job_id)
    return Submitted(job, created=True)


def _earlier_job(ctx: ApiContext, submission: Submission) -> Job | None:
    if not submission.idempotency_key:
        return None
    with session_scope(ctx.settings.resolved_database_url) as session:
        return job_store.find_by_idempotency_key(session, submission.owner, submission.idempotency_key)


def _check_limits(ctx: ApiContext, owner: str) -> None:
    """Per-key rate limit (Redis; fails open when Redis is down) and active-jobs quota."""
    settings = ctx.settings
    retry_after = None
    if settings.rate_limit_per_minute:
        try:
            retry_after = ratelimit.hit(ctx.redis(), owner, settings.rate_limit_per_minute)
        except RedisError as exc:  # fail open: a broker outage must not stop accepting work
            log.warning("rate limit not checked (redis unavailable): %s", exc)
    if retry_after is not None:
        raise ApiError(
            429,
            "rate_limited",
            f"more than {settings.rate_limit_per_minute} submissions a minute",
            {"Retry-After": str(retry_after)},
        )
    if settings.max_active_jobs_per_key:
        with session_scope(settings.resolved_database_url) as session:
            if job_store.count_active(session, owner) >= settings.max_active_jobs_per_key:
                raise ApiError(
                    429,
                    "too_many_active_jobs",
                    f"at most {settings.max_active_jobs_per_key} queued or running jobs per key",
                    {"Retry-After": "10"},
                )


def _insert(ctx: ApiContext, job: Job, submission: Submission) -> Job | None:
    """Insert the row; returns the earlier job when a concurrent request with the same
    Idempotency-Key won the race (this upload is then removed)."""
    url = ctx.settings.resolved_database_url
    try:
        with session_scope(url) as session:
            session.add(job)
    except IntegrityError:
        ctx.storage.delete_prefix(upload_prefix(job.id))
        with session_scope(url) as session:
            return job_store.find_by_idempotency_key(session, submission.owner, submission.idempotency_key)
    except Exception:
        ctx.storage.delete_prefix(upload_prefix(job.id))
        raise
    return None


def _enqueue(ctx: ApiContext, job_id: str) -> None:
    try:
        send_job(ctx.settings, job_id)
        with session_scope(ctx.settings.resolved_database_url) as session:
            job_store.mark_enqueued(session, job_id)
    except Exception as exc:  # broker down: the row stays queued; the reconciler sends it later
        log.warning("job %s accepted but not sent yet: %s", job_id, exc)
