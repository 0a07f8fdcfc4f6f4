"""Submitting a job: the one operation behind ``POST /api/v1/jobs``, apart from the view.

Order matters for cost and for correctness: the rate limit is counted first (by the route,
before the multipart body is even parsed: `count_rate`) and the form fields are bounded
before anything reads them (a hostile request must not get expensive work
for free); then cheap checks (idempotency, parameters against the catalogue, the image
header), the active-jobs quota, and the only steps that write (store the upload, insert the
row within the quota atomically, send the id). Every failure either leaves nothing
behind or leaves a row the reconciler finishes (broker down: the row stays `queued`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO

from redis.exceptions import RedisError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api import ratelimit
from api.context import ApiContext
from api.error_handlers import ApiError
from api.input_probe import probe_input
from shared.catalog import require_available
from shared.input_urls import open_location
from shared.jobs import job_store
from shared.jobs.database import session_scope
from shared.jobs.job_status import RETRYABLE
from shared.jobs.queue import send_job
from shared.jobs.tables import Job, new_job_id
from shared.jobspec import check_field_sizes, validate_params
from shared.storage import CHUNK, StorageError, mask_key, upload_key, upload_prefix
from shared.webhook_signing import check_destination

log = logging.getLogger("heatmaps.api")


@dataclass(frozen=True)
class Submission:
    """A parsed request: who asks, the form fields (as parsed by api.schemas.SubmitSchema,
    without the image), the uploaded image (a seekable stream)."""

    owner: str
    form: Mapping[str, Any]
    image: BinaryIO | None  # None when the form names an image_url instead
    idempotency_key: str | None = None
    mask: BinaryIO | None = None  # an uploaded mask picture (the `mask` file field)


@dataclass(frozen=True)
class Submitted:
    job: Job
    created: bool  # False: an earlier job with the same Idempotency-Key (or an earlier retry)


def request_fingerprint(form: Mapping[str, Any], image_sha256: str) -> str:
    """What an Idempotency-Key stands for: the parsed parameters and the image's sha256."""
    canonical = json.dumps({"form": dict(form), "image_sha256": image_sha256}, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _idempotency_conflict() -> ApiError:
    return ApiError(
        422,
        "idempotency_conflict",
        "this Idempotency-Key was used for a request with other parameters or another image; use a new key",
    )


def submit_job(ctx: ApiContext, submission: Submission) -> Submitted:
    """Validate, check limits, store the upload, insert the row and enqueue the job id.

    Raises `InputError` for bad input (mapped to 4xx by the error handlers) and `ApiError`
    for limits (429) and storage outages (503).
    """
    # The rate limit was counted before the body was parsed (`count_rate`, api.routes.job_routes).
    check_field_sizes(submission.form)  # then bound the fields, before anything reads them
    earlier = _earlier_job(ctx, submission)
    if earlier is not None:
        if earlier.request_fingerprint not in (None, _fingerprint_of(submission)):
            raise _idempotency_conflict()
        return Submitted(earlier, created=False)
    settings = ctx.settings
    info = ctx.catalog().get(submission.form.get("model") or settings.default_model)
    require_available(info, settings.vgg16_weights)  # 400 model_unavailable, not a job that would fail
    params = validate_params(
        submission.form,
        info,
        max_batch_size=settings.max_batch_size,
        max_top_k=settings.max_top_k,
        memory_budget_mb=settings.memory_budget_mb,
        mask_min_fraction=settings.mask_min_fraction,
        shards_max=settings.shards_max,
    )
    callback_url = _callback_url(submission, settings)
    params, image = probe_input(settings, submission, params, info.input_size)
    _check_limits(ctx, submission.owner)

    job_id = new_job_id()
    key, size, digest = _store_input(ctx, job_id, submission, params, image)
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
        request_fingerprint=request_fingerprint(submission.form, digest),
    )
    winner = _insert(
        ctx, job, lambda session: job_store.find_by_idempotency_key(session, job.owner, job.idempotency_key)
    )
    if winner is not None:
        if winner.request_fingerprint not in (None, job.request_fingerprint):
            raise _idempotency_conflict()
        return Submitted(winner, created=False)
    _enqueue(ctx, job_id)
    return Submitted(job, created=True)


def _callback_url(submission: Submission, settings) -> str | None:
    """The webhook destination, checked by the SSRF guard (400 invalid_callback_url)."""
    callback_url = submission.form.get("callback_url") or None
    if callback_url is not None:
        check_destination(callback_url, settings)
    return callback_url


def _fingerprint_of(submission: Submission) -> str:
    """Hash the incoming image (only on an Idempotency-Key replay) and fingerprint the request;
    an image_url stands for itself (as it does in the stored row)."""
    if submission.image is None:
        reference = str(submission.form.get("image_url")).encode()
        return request_fingerprint(submission.form, hashlib.sha256(reference).hexdigest())
    digest = hashlib.sha256()
    submission.image.seek(0)
    while chunk := submission.image.read(CHUNK):
        digest.update(chunk)
    submission.image.seek(0)
    return request_fingerprint(submission.form, digest.hexdigest())


def _store_input(ctx: ApiContext, job_id: str, submission: Submission, params, image) -> tuple[str, int, str]:
    """Stream the upload (and mask) to storage; (image key or URL, bytes, sha256)."""
    try:
        if submission.mask is not None:
            submission.mask.seek(0)
            ctx.storage.put_stream(mask_key(job_id), submission.mask)
        if params.image_url:  # read in place by the worker; the digest names the reference
            return params.image_url, 0, hashlib.sha256(params.image_url.encode()).hexdigest()
        key = upload_key(job_id, image.extension)
        submission.image.seek(0)
        size, digest = ctx.storage.put_stream(key, submission.image)
        return key, size, digest
    except StorageError as exc:
        log.error("upload store failed: %s", exc)
        ctx.storage.delete_prefix(upload_prefix(job_id))
        raise ApiError(
            503, "storage_unavailable", "could not store the upload; try again shortly", {"Retry-After": "5"}
        ) from None


def _earlier_job(ctx: ApiContext, submission: Submission) -> Job | None:
    if not submission.idempotency_key:
        return None
    with session_scope(ctx.settings.resolved_database_url) as session:
        return job_store.find_by_idempotency_key(session, submission.owner, submission.idempotency_key)


def count_rate(ctx: ApiContext, owner: str) -> None:
    """Per-key rate limit (Redis; fails open when Redis is down), counted for every
    submission before its body is parsed or validated, so that a request refused while
    parsing (no image, a bad field) or expensive input costs a hit too (issue 20)."""
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


def _check_limits(ctx: ApiContext, owner: str) -> None:
    """Active-jobs quota, early (before the upload is stored); `_insert` re-checks it
    atomically with the insert, which is what makes it hold under concurrency."""
    settings = ctx.settings
    if settings.max_active_jobs_per_key:
        with session_scope(settings.resolved_database_url) as session:
            if job_store.count_active(session, owner) >= settings.max_active_jobs_per_key:
                raise _quota_error(settings.max_active_jobs_per_key)


def _quota_error(limit: int) -> ApiError:
    return ApiError(
        429, "too_many_active_jobs", f"at most {limit} queued or running jobs per key", {"Retry-After": "10"}
    )


def _insert(ctx: ApiContext, job: Job, find_winner: Callable[[Session], Job | None]) -> Job | None:
    """Insert the row if the owner is within the active-jobs quota (count and insert are
    one serialized section: `job_store.add_within_quota`); returns the earlier job when a
    concurrent request won the race for the same unique value (Idempotency-Key, or the
    retried job). A refused, lost or failed insert removes this upload."""
    url = ctx.settings.resolved_database_url
    limit = ctx.settings.max_active_jobs_per_key
    try:
        with session_scope(url) as session:
            if not job_store.add_within_quota(session, job, limit):
                raise _quota_error(limit)
    except IntegrityError:
        log.info("job %s lost an insert race (Idempotency-Key or retry); answering with the winner", job.id)
        ctx.storage.delete_prefix(upload_prefix(job.id))
        with session_scope(url) as session:
            return find_winner(session)
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


# --- retry ---------------------------------------------------------------------------------


def retry_job(ctx: ApiContext, owner: str, job_id: str) -> Submitted:
    """A new job linked to a failed or canceled one (`retry_of`), on a copy of its stored
    upload: the old job keeps its history and its own files (deleting or expiring either job
    never takes the other's input), and the new one gets a fresh attempts budget. Retrying
    the same job again returns the retry that exists (one retry per job: a unique column).

    404 unknown job, 409 `job_not_retryable` (not failed or canceled) or `input_gone` (the
    upload was deleted: an unreadable image, or retention; or the image_url vanished),
    403 `url_not_allowed` (an image_url link that now leads outside), 429 limits, 503 storage.
    """
    url = ctx.settings.resolved_database_url
    with session_scope(url) as session:
        old = job_store.get_job(session, job_id, owner=owner)
        if old is None:
            raise ApiError(404, "not_found", "no such job")
        if old.status not in RETRYABLE:
            raise ApiError(
                409, "job_not_retryable", f"the job is {old.status}; only failed or canceled jobs are retried"
            )
        earlier = job_store.find_retry(session, old.id)
    if earlier is not None:
        return Submitted(earlier, created=False)
    ctx.catalog().get(old.model)  # the model must still be offered (400 unknown_model)
    count_rate(ctx, owner)
    _check_limits(ctx, owner)
    job = _copy_for_retry(ctx, old)
    winner = _insert(ctx, job, lambda session: job_store.find_retry(session, old.id))
    if winner is not None:
        return Submitted(winner, created=False)
    _enqueue(ctx, job.id)
    return Submitted(job, created=True)


def _copy_for_retry(ctx: ApiContext, old: Job) -> Job:
    """A new row on a copy of the old job's stored input (an image_url is read in place,
    so it is reused as it is); the uploaded mask picture is copied too."""
    new_id = new_job_id()
    key, size, digest = old.image_key, old.image_bytes, old.image_sha256
    image_url = (old.params or {}).get("image_url")
    if image_url:  # 409 input_gone while it is missing, 403 when a link now leads outside
        open_location(image_url, ctx.settings.input_url_prefixes)
    try:
        if not image_url:
            key = upload_key(new_id, "." + old.image_key.rsplit(".", 1)[-1])
            size, digest = _copy_object(ctx, old.image_key, key)
        if (old.params or {}).get("mask") == "image":
            _copy_object(ctx, mask_key(old.id), mask_key(new_id))
    except FileNotFoundError:
        ctx.storage.delete_prefix(upload_prefix(new_id))
        raise ApiError(
            409, "input_gone", "the job's upload no longer exists (unreadable image or retention); submit it again"
        ) from None
    except (StorageError, OSError) as exc:
        log.error("retry copy failed: %s", exc)
        ctx.storage.delete_prefix(upload_prefix(new_id))
        raise ApiError(
            503, "storage_unavailable", "could not copy the upload; try again shortly", {"Retry-After": "5"}
        ) from None
    columns = ("owner", "model", "mode", "params", "image_format", "image_width", "image_height", "callback_url")
    return Job(
        id=new_id,
        retry_of=old.id,
        image_key=key,
        image_sha256=digest,
        image_bytes=size,
        **{name: getattr(old, name) for name in columns},
    )


def _copy_object(ctx: ApiContext, source_key: str, target_key: str) -> tuple[int, str]:
    with ctx.storage.open(source_key) as source:
        return ctx.storage.put_stream(target_key, source)
