"""/api/v1/jobs: submit an image, poll a job, list jobs, download artifacts, cancel/delete, retry."""

from __future__ import annotations

import logging
import re

from flask import Response, current_app, g, request, send_file, stream_with_context, url_for
from flask.views import MethodView
from flask_smorest import Blueprint

from api.auth import authenticate
from api.error_handlers import ApiError
from api.job_submission import Submission, count_rate, retry_job, submit_job
from api.multipart_form import MultipartParser
from api.schemas import (
    IMAGE_FIELD,
    MASK_FIELD,
    RETRY_AFTER_HEADER,
    JobListQuerySchema,
    JobListSchema,
    JobSchema,
    SubmitSchema,
    SummarySchema,
    download_doc,
    media_type,
)
from shared.error_text import public_message
from shared.jobs import job_metrics, job_store, shard_store
from shared.jobs.database import session_scope
from shared.jobs.job_status import ACTIVE, JobStatus, public_phase
from shared.jobs.tables import Job
from shared.storage import shard_prefix

log = logging.getLogger("heatmaps.api")
blp = Blueprint("jobs", __name__, url_prefix="/api/v1/jobs", description="Heatmap jobs")
blp.before_request(authenticate)


@blp.before_request
def _count_submission() -> None:
    """Every submission counts against the rate limit, before its body is parsed: a request
    the form parser refuses (no image, a bad field) is a hit too (issue 20)."""
    if request.method == "POST" and request.endpoint == "jobs.Jobs":
        count_rate(_ctx(), g.owner)


blp.ARGUMENTS_PARSER = MultipartParser()  # the submission form and its file parsed by one schema

JOB_ID_RE = re.compile(r"^[0-9a-f]{32}$")


def _ctx():
    return current_app.extensions["heatmaps"]


def _db():
    return session_scope(_ctx().settings.resolved_database_url)


def job_url(job_id: str) -> str:
    return url_for("jobs.Job", job_id=job_id)


def represent(job: Job, shards: dict | None = None) -> dict:
    """The job as clients see it; artifact links only through the job routes. `shards`: the
    job's shard summary when the caller read it already (a page of jobs: one query)."""
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
        result |= _map_output_links(job)
    return {
        "id": job.id,
        "status": job.status,
        "phase": public_phase(job.status, job.phase),
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
        "error": {"code": job.error_code, "message": public_message(job.error_message or "")}
        if job.error_code
        else None,
        "result": result,
        "retry_of": job.retry_of,
        "url": job_url(job.id),
        "webhook": _webhook(job),
        "shards": shards if shards is not None else _shards(job),
    }


def _shards(job: Job) -> dict | None:
    """A sharded job's shards (count, done, workers, recomputed); None for a job one worker
    runs. Read from the shard rows while they exist, else from the result's summary."""
    if job.status == JobStatus.succeeded and job.result:
        return job.result["summary"].get("shards")
    if not job.shards_total:
        return None
    with _db() as session:
        return shard_store.summaries(session, [job.id]).get(job.id)


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


def _map_output_links(job: Job) -> dict:
    """Links to heatmap.tif and the regions, for jobs whose worker wrote them."""
    artifacts = job.result.get("artifacts", {})
    links = {}
    if "raster" in artifacts:
        links["raster_url"] = url_for("jobs.raster", job_id=job.id)
    if "regions" in artifacts:
        links["regions_url"] = url_for("jobs.regions", job_id=job.id)
    if "regions_map" in artifacts:
        links["regions_map_url"] = url_for("jobs.regions_map", job_id=job.id)
    return links


def poll_headers(job: Job, headers: dict | None = None) -> dict:
    """Retry-After on every answer about a job that has not finished yet."""
    headers = dict(headers or {})
    if job.status in ACTIVE:
        headers["Retry-After"] = str(_ctx().settings.poll_retry_after_s)
    return headers


def _load_job(session, job_id: str) -> Job:
    job = job_store.get_job(session, job_id, owner=g.owner) if JOB_ID_RE.match(job_id) else None
    if job is None:
        raise ApiError(404, "not_found", "no such job")
    return job


def _idempotency_key() -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is not None and not (0 < len(key) <= 200):
        raise ApiError(400, "invalid_parameter", "Idempotency-Key must be 1 to 200 characters")
    return key or None


@blp.route("")
class Jobs(MethodView):
    @blp.doc(operationId="listJobs")
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
            sharded = shard_store.summaries(session, [job.id for job in page.jobs if job.shards_total])
            jobs = [represent(job, sharded.get(job.id)) if job.id in sharded else represent(job) for job in page.jobs]
            return {"jobs": jobs, "next_cursor": page.next_cursor}

    @blp.doc(
        operationId="submitJob",
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
    @blp.arguments(SubmitSchema, location="files", error_status_code=400)
    @blp.response(202, JobSchema, description="accepted; poll the Location", headers=RETRY_AFTER_HEADER)
    @blp.alt_response(
        200,
        schema=JobSchema,
        description="an earlier job with the same Idempotency-Key and the same request",
        headers=RETRY_AFTER_HEADER,
    )
    def post(self, form):
        """Submit an image for heatmaps (multipart/form-data).

        Reusing an Idempotency-Key with other parameters or another image is refused with
        422 `idempotency_conflict`."""
        image, mask = form.pop(IMAGE_FIELD, None), form.pop(MASK_FIELD, None)
        submission = Submission(
            owner=g.owner,
            form=form,
            image=image.stream if image is not None else None,
            idempotency_key=_idempotency_key(),
            mask=mask.stream if mask is not None else None,
        )
        outcome = submit_job(_ctx(), submission)
        job = outcome.job
        return represent(job), 202 if outcome.created else 200, poll_headers(job, {"Location": job_url(job.id)})


@blp.route("/<string:job_id>", endpoint="Job")
class JobResource(MethodView):
    @blp.doc(operationId="getJob")
    @blp.response(200, JobSchema, headers=RETRY_AFTER_HEADER)
    def get(self, job_id):
        """Status, progress, and when succeeded the result with artifact links."""
        with _db() as session:
            job = _load_job(session, job_id)
            return represent(job), 200, poll_headers(job)

    @blp.doc(operationId="deleteJob")
    @blp.response(202, JobSchema, description="cancel requested: the job is canceled")
    @blp.alt_response(204, description="a finished job: deleted with its files")
    def delete(self, job_id):
        """Cancel a queued or running job; delete a finished job and its artifacts."""
        with _db() as session:
            job = _load_job(session, job_id)
            if job_store.cancel(session, job.id):
                session.commit()
                job_metrics.count_outcome(_ctx().settings, JobStatus.canceled)
                _discard_partials(job)
                session.refresh(job)
                return represent(job), 202
        with _db() as session:
            job = _load_job(session, job_id)
            if not job_store.delete_finished(session, job.id) and job_store.existing_ids(session, [job.id]):
                raise ApiError(409, "conflict", "the job became active again meanwhile; look at it again")
        # Row first, then files: a crash in between leaves files without a row (the
        # reconciler's orphan sweep removes them), never a row pointing at missing files.
        _ctx().storage.delete_job_files(job.id)
        _ctx().tiles.forget(job.id)  # its open input, if the viewer read tiles from it
        return "", 204


@blp.route("/<string:job_id>/cancel", endpoint="cancel")
class JobCancel(MethodView):
    @blp.doc(operationId="cancelJob")
    @blp.response(202, JobSchema, description="the job is canceled")
    def post(self, job_id):
        """Cancel a queued or running job. Unlike DELETE it never deletes: a job that already
        ended answers 409 `job_finished` and keeps its results (`heatmap cancel` uses this)."""
        with _db() as session:
            job = _load_job(session, job_id)
            if not job_store.cancel(session, job.id):
                raise ApiError(
                    409, "job_finished", f"the job has already ended ({job.status}); there is nothing to cancel"
                )
            session.commit()
            _discard_partials(job)
            session.refresh(job)
            return represent(job), 202


def _discard_partials(job: Job) -> None:
    """A canceled sharded job's partial grids are of no use: removed now (a shard storing one
    meanwhile finds the job canceled at its commit and removes its own). A storage hiccup
    leaves them to the job's deletion; the cancel stands either way."""
    if not job.shards_total:
        return
    try:
        _ctx().storage.delete_prefix(shard_prefix(job.id))
    except Exception as exc:
        log.warning("partial grids of canceled job %s not removed yet: %s", job.id, exc)


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
    mimetype = media_type(key)
    if local is not None:
        if not local.is_file():
            raise ApiError(404, "not_found", "the artifact is gone (retention)")
        return send_file(local, mimetype=mimetype, download_name=key.rsplit("/", 1)[1], max_age=0)
    try:
        chunks = storage.iter_chunks(key)
    except FileNotFoundError:
        raise ApiError(404, "not_found", "the artifact is gone (retention)") from None
    return Response(stream_with_context(chunks), mimetype=mimetype)


@blp.route("/<string:job_id>/retry", methods=["POST"], endpoint="retry")
@blp.doc(operationId="retryJob")
@blp.response(
    202, JobSchema, description="a new job on a copy of the same input; poll its Location", headers=RETRY_AFTER_HEADER
)
@blp.alt_response(
    200, schema=JobSchema, description="the job was retried before: that retry", headers=RETRY_AFTER_HEADER
)
def retry(job_id):
    """Retry a failed or canceled job: a new job linked by `retry_of` (409 for other states)."""
    if not JOB_ID_RE.match(job_id):
        raise ApiError(404, "not_found", "no such job")
    outcome = retry_job(_ctx(), g.owner, job_id)
    job = outcome.job
    return represent(job), 202 if outcome.created else 200, poll_headers(job, {"Location": job_url(job.id)})


@blp.route("/<string:job_id>/heatmap", endpoint="heatmap")
@blp.doc(
    **download_doc(
        "getHeatmap", "npz", "heatmap.npz: scores (rows, cols, classes), classes, rows, cols, window, stride"
    )
)
def heatmap(job_id):
    """Download the score grid as a NumPy .npz."""
    return _artifact(job_id, lambda a: a["heatmap"])


@blp.route("/<string:job_id>/summary", endpoint="summary")
@blp.doc(**download_doc("getSummary", "json", "summary.json", SummarySchema))
def summary(job_id):
    """Download the run summary (per class max, mean, peak; timings; parameters)."""
    return _artifact(job_id, lambda a: a["summary"])


@blp.route("/<string:job_id>/overlays/<string:class_name>", endpoint="overlay")
@blp.doc(**download_doc("getOverlay", "png", "PNG overlay"))
def overlay(job_id, class_name):
    """Download one class's overlay PNG (by class name, as listed in the result)."""
    return _artifact(job_id, lambda a: a["overlays"].get(class_name))


@blp.route("/<string:job_id>/raster", endpoint="raster")
@blp.doc(
    **download_doc(
        "getRaster",
        "tif",
        "heatmap.tif: tiled pyramidal float32 TIFF, one band per selected class, NaN = not computed;"
        " a GeoTIFF in the source's CRS for georeferenced input",
    )
)
def raster(job_id):
    """Download the score maps as a tiled, pyramidal (Geo)TIFF (QGIS, GDAL, QuPath)."""
    return _artifact(job_id, lambda a: a.get("raster"))


@blp.route("/<string:job_id>/regions", endpoint="regions")
@blp.doc(
    **download_doc(
        "getRegions",
        "geojson",
        "regions.geojson: per class, regions of cells at or above the threshold as QuPath annotations"
        " (level-0 pixel coordinates)",
        {"type": "object"},
    )
)
def regions(job_id):
    """Download the regions at or above the job's threshold (QuPath: File > Import objects)."""
    return _artifact(job_id, lambda a: a.get("regions"))


@blp.route("/<string:job_id>/regions/map", endpoint="regions_map")
@blp.doc(
    **download_doc(
        "getRegionsMap",
        "geojson",
        "regions_map.geojson: the regions in the source's map coordinates, CRS named in `crs`",
        {"type": "object"},
    )
)
def regions_map(job_id):
    """Download the regions in map coordinates (georeferenced input only; 404 otherwise)."""
    return _artifact(job_id, lambda a: a.get("regions_map"))
