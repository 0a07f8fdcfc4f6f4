"""/api/v1/jobs: submit an image, poll a job, list jobs, download artifacts, cancel/delete."""

from __future__ import annotations

import logging
import re

from flask import Response, current_app, g, request, send_file, stream_with_context, url_for
from flask.views import MethodView
from flask_smorest import Blueprint

from api.auth import authenticate
from api.error_handlers import ApiError
from api.job_submission import Submission, submit_job
from api.schemas import SUBMIT_REQUEST_BODY, JobListQuerySchema, JobListSchema, JobSchema
from shared import job_metrics, job_store
from shared.database import session_scope
from shared.job_status import JobStatus
from shared.jobspec import FORM_FIELD_NAMES
from shared.tables import Job

log = logging.getLogger("heatmaps.api")
blp = Blueprint("jobs", __name__, url_prefix="/api/v1/jobs", description="Heatmap jobs")
blp.before_request(authenticate)

JOB_ID_RE = re.compile(r"^[0-9a-f]{32}$")


def _ctx():
    return current_app.extensions["heatmaps"]


def _db():
    return session_scope(_ctx().settings.resolved_database_url)


def job_url(job_id: str) -> str:
    return url_for("jobs.Job", job_id=job_id)


def represent(job: Job) -> dict:
    """The job as clients see it; artifact links only through the job routes."""
    result = None
    if job.status == JobStatus.succeeded and job.result:
        summary = job.result["summary"]
        result = {
            "classes": [
                {key: c[key] for key in ("name", "index", "max", "mean", "peak")}
                | {"overlay_url": url_for("jobs.overlay", job_id=job.id, class_name=c["name"])}
                for c in summary["classes"]
            ],
            "grid": summary["grid"],
            "overlay_size": summary["overlay_size"],
            "timings": summary["timings"],
            "heatmap_url": url_for("jobs.heatmap", job_id=job.id),
            "summary_url": url_for("jobs.summary", job_id=job.id),
        }
    return {
        "id": job.id,
        "status": job.status,
        "progress": job.progress,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "model": job.model,
        "mode": job.mode,
        "params": job.params,
        "attempts": job.attempts,
        "worker": job.worker,
        "image": {
            "width": job.image_width,
            "height": job.image_height,
            "sha256": job.image_sha256,
            "format": job.image_format,
            "bytes": job.image_bytes,
        },
        "error": {"code": job.error_code, "message": job.error_message or ""} if job.error_code else None,
        "result": result,
        "url": job_url(job.id),
        "webhook": _webhook(job),
    }


def _webhook(job: Job) -> dict | None:
    """The delivery record of a job with a callback_url (state None: not attempted yet)."""
    if not job.callback_url:
        return None
    return {
        "url": job.callback_url,
        "state": job.webhook_state,
        "attempts": job.webhook_attempts or 0,
        "last_status": job.webhook_last_status,
        "last_error": job.webhook_last_error,
        "last_attempt_at": job.webhook_last_at,
        "next_attempt_at": job.webhook_next_at,
    }


def _load_job(session, job_id: str) -> Job:
    job = job_store.get_job(session, job_id, owner=g.owner) if JOB_ID_RE.match(job_id) else None
    if job is None:
        raise ApiError(404, "not_found", "no such job")
    return job


def _read_submission() -> Submission:
    """The request's shape: one image part, known form fields each given once, a sane
    Idempotency-Key. Parameter values are checked by `submit_job`."""
    image = _single_image()
    key = request.headers.get("Idempotency-Key")
    if key is not None and not (0 < len(key) <= 200):
        raise ApiError(400, "invalid_parameter", "Idempotency-Key must be 1 to 200 characters")
    return Submission(owner=g.owner, form=request.form, image=image.stream, idempotency_key=key or None)


def _single_image():
    if not (request.mimetype or "").startswith("multipart/form-data"):
        raise ApiError(415, "unsupported_media_type", "send the image as multipart/form-data with an 'image' field")
    files = request.files  # parses the body; werkzeug enforces the size, field and part limits (413)
    unexpected = [name for name in files if name != "image"]
    if unexpected:
        raise ApiError(400, "unexpected_field", f"unexpected file field {str(unexpected[0])[:50]!r}")
    images = files.getlist("image")
    if not images:
        raise ApiError(400, "missing_image", "the 'image' file field is required")
    if len(images) > 1:
        raise ApiError(400, "multiple_images", "send exactly one 'image' per job")
    unknown = [name for name in request.form if name not in FORM_FIELD_NAMES]
    if unknown:
        raise ApiError(400, "unexpected_field", f"unknown form field {str(unknown[0])[:50]!r}")
    for name in request.form:
        if len(request.form.getlist(name)) > 1:
            raise ApiError(400, "invalid_parameter", f"form field {name!r} given more than once")
    return images[0]


@blp.route("")
class Jobs(MethodView):
    @blp.arguments(JobListQuerySchema, location="query")
    @blp.response(200, JobListSchema)
    def get(self, query):
        """List your jobs, newest first, optionally by status; follow `next_cursor` for more."""
        unknown = [name for name in request.args if name not in ("status", "limit", "cursor")]
        if unknown:
            raise ApiError(400, "invalid_parameter", f"unknown query parameter {unknown[0][:50]!r}")
        with _db() as session:
            try:
                page = job_store.list_jobs(session, g.owner, query.get("status"), query["limit"], query.get("cursor"))
            except job_store.BadCursor:
                raise ApiError(400, "invalid_parameter", "cursor is not valid") from None
            return {"jobs": [represent(job) for job in page.jobs], "next_cursor": page.next_cursor}

    @blp.doc(
        requestBody=SUBMIT_REQUEST_BODY,
        parameters=[
            {
                "in": "header",
                "name": "Idempotency-Key",
                "required": False,
                "schema": {"type": "string", "maxLength": 200},
                "description": "the same key returns the same job (200) instead of creating a new one",
            }
        ],
    )
    @blp.response(202, JobSchema, description="accepted; poll the Location")
    @blp.alt_response(200, schema=JobSchema, description="an earlier job with the same Idempotency-Key")
    def post(self):
        """Submit an image for heatmaps (multipart/form-data)."""
        outcome = submit_job(_ctx(), _read_submission())
        job = outcome.job
        return represent(job), 202 if outcome.created else 200, {"Location": job_url(job.id)}


@blp.route("/<string:job_id>", endpoint="Job")
class JobResource(MethodView):
    @blp.response(200, JobSchema)
    def get(self, job_id):
        """Status, progress, and when succeeded the result with artifact links."""
        with _db() as session:
            return represent(_load_job(session, job_id))

    @blp.response(202, JobSchema, description="cancel requested: the job is canceled")
    @blp.alt_response(204, description="a finished job: deleted with its files")
    def delete(self, job_id):
        """Cancel a queued or running job; delete a finished job and its artifacts."""
        with _db() as session:
            job = _load_job(session, job_id)
            if job_store.cancel(session, job.id):
                session.commit()
                job_metrics.count_outcome(_ctx().settings, JobStatus.canceled)
                session.refresh(job)
                return represent(job), 202
        with _db() as session:
            job = _load_job(session, job_id)
            _ctx().storage.delete_job_files(job.id)
            job_store.delete_finished(session, job.id)
        return "", 204


def _artifact(job_id: str, pick):
    with _db() as session:
        job = _load_job(session, job_id)
        if job.status != JobStatus.succeeded or not job.result:
            raise ApiError(409, "job_not_finished", f"the job is {job.status}; artifacts exist once it succeeded")
        key = pick(job.result["artifacts"])
    if key is None:
        raise ApiError(404, "not_found", "no such artifact")
    storage = _ctx().storage
    local = storage.local_path(key)
    mimetype = {"npz": "application/octet-stream", "json": "application/json", "png": "image/png"}[
        key.rsplit(".", 1)[1]
    ]
    if local is not None:
        if not local.is_file():
            raise ApiError(404, "not_found", "the artifact is gone (retention)")
        return send_file(local, mimetype=mimetype, download_name=key.rsplit("/", 1)[1], max_age=0)
    try:
        chunks = storage.iter_chunks(key)
    except FileNotFoundError:
        raise ApiError(404, "not_found", "the artifact is gone (retention)") from None
    return Response(stream_with_context(chunks), mimetype=mimetype)


@blp.route("/<string:job_id>/heatmap", endpoint="heatmap")
@blp.response(
    200,
    description="heatmap.npz: scores (rows, cols, classes), classes, rows, cols, window, stride",
    content_type="application/octet-stream",
)
def heatmap(job_id):
    """Download the score grid as a NumPy .npz."""
    return _artifact(job_id, lambda a: a["heatmap"])


@blp.route("/<string:job_id>/summary", endpoint="summary")
@blp.response(200, description="summary.json", content_type="application/json")
def summary(job_id):
    """Download the run summary (per class max, mean, peak; timings; parameters)."""
    return _artifact(job_id, lambda a: a["summary"])


@blp.route("/<string:job_id>/overlays/<string:class_name>", endpoint="overlay")
@blp.response(200, description="PNG overlay", content_type="image/png")
def overlay(job_id, class_name):
    """Download one class's overlay PNG (by class name, as listed in the result)."""
    return _artifact(job_id, lambda a: a["overlays"].get(class_name))
