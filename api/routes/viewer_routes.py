"""/api/v1/jobs/<id>/viewer and /dzi/...: what the job page's deep-zoom viewer reads.

The worker writes what only it knows: a Deep Zoom pyramid of each class's heat layer (small:
a few pixels per grid stride) and a manifest (`viewer.json`: layers, score ranges, peaks, the
score grid). The image layer is not copied: its tiles are read from the job's own input when
asked for (`api.tile_server`), with a strong ETag and `immutable` caching. All of it is served
behind the same API key and ownership checks as every other artifact (the browser sends the
key as a header on tile requests too), so the page's HTML needs no key and no cookie.
"""

from __future__ import annotations

from flask import Response, request, send_file, stream_with_context
from flask_smorest import Blueprint

from api.auth import authenticate
from api.error_handlers import ApiError
from api.routes.job_routes import _ctx, _db, _load_job
from api.tile_server import RENDER_VERSION, input_ref
from shared.image_sources.dzi_geometry import IMAGE_FORMAT, descriptor_xml, tile_box
from shared.jobs.job_status import JobStatus
from shared.storage import IMAGE_LAYER, dzi_descriptor_name, dzi_tile_name, is_layer_name, viewer_key

blp = Blueprint("viewer", __name__, url_prefix="/api/v1/jobs", description="Deep-zoom viewer data")
blp.before_request(authenticate)

MIMETYPES = {"json": "application/json", "dzi": "application/xml", "jpeg": "image/jpeg", "png": "image/png"}


#: Tiles and descriptors never change for a job id; `private`: they belong to one key.
IMMUTABLE = "private, max-age=31536000, immutable"


def _succeeded_job(job_id: str):
    """The caller's succeeded job (404 for another key's job, 409 before it succeeded)."""
    with _db() as session:
        job = _load_job(session, job_id)
        if job.status != JobStatus.succeeded or not job.result:
            raise ApiError(409, "job_not_finished", f"the job is {job.status}; the viewer exists once it succeeded")
        session.expunge(job)
    return job


def _viewer_file(job_id: str, name: str, cache_s: int = 0):
    """Stream one file of a succeeded job's viewer folder (404 when absent: an older job, or
    a name the worker never writes)."""
    job = _succeeded_job(job_id)
    key = viewer_key(job.id, name)
    storage = _ctx().storage
    mimetype = MIMETYPES[name.rsplit(".", 1)[1]]
    local = storage.local_path(key)
    if local is not None:
        if not local.is_file():
            raise ApiError(404, "not_found", "no such viewer file")
        response = send_file(local, mimetype=mimetype, max_age=cache_s)
    else:
        if not storage.fs.exists(storage.path(key)):
            raise ApiError(404, "not_found", "no such viewer file")
        response = Response(stream_with_context(storage.iter_chunks(key)), mimetype=mimetype)
    # Tiles never change once written; `private`: they belong to one key.
    response.headers["Cache-Control"] = f"private, max-age={cache_s}"
    return response


def _layer(layer: str) -> str:
    if not is_layer_name(layer):
        raise ApiError(404, "not_found", "no such layer")
    return layer


@blp.route("/<string:job_id>/viewer", endpoint="manifest")
@blp.doc(operationId="getViewerManifest")
@blp.response(200, description="viewer.json: image and heat layers, score ranges, peaks, score grid")
def manifest(job_id):
    """The viewer's manifest: Deep Zoom layers, each class's score range and peak, the grid."""
    return _viewer_file(job_id, "viewer.json")


@blp.route("/<string:job_id>/dzi/<string:layer>.dzi", endpoint="descriptor")
@blp.doc(operationId="getDeepZoomDescriptor")
@blp.response(200, description="Deep Zoom descriptor (XML)", content_type="application/xml")
def descriptor(job_id, layer):
    """Deep Zoom descriptor of the image (`image`) or of one class's heat (`heat_<index>`)."""
    if _layer(layer) == IMAGE_LAYER:
        job = _succeeded_job(job_id)
        response = Response(descriptor_xml(job.image_width, job.image_height, IMAGE_FORMAT), mimetype="application/xml")
        response.headers["Cache-Control"] = IMMUTABLE
        return response
    return _viewer_file(job_id, dzi_descriptor_name(layer))


@blp.route("/<string:job_id>/dzi/<string:layer>_files/<int:level>/<int:col>_<int:row>.<string:ext>", endpoint="tile")
@blp.doc(
    operationId="getDeepZoomTile",
    responses={
        "200": {
            "description": "one Deep Zoom tile: JPEG for the image layer, PNG with transparency for heat",
            "content": {
                "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
                "image/png": {"schema": {"type": "string", "format": "binary"}},
            },
        }
    },
)
@blp.response(200, description="one Deep Zoom tile", content_type="image/jpeg")
def tile(job_id, layer, level, col, row, ext):
    """One tile of a Deep Zoom layer (JPEG for the image, PNG with transparency for heat)."""
    if ext not in ("jpeg", "png") or level > 64:
        raise ApiError(404, "not_found", "no such tile")
    if _layer(layer) == IMAGE_LAYER:
        return _image_tile(job_id, level, col, row, ext)
    return _viewer_file(job_id, dzi_tile_name(layer, level, col, row, ext), cache_s=3600)


def _image_tile(job_id: str, level: int, col: int, row: int, ext: str):
    """A tile of the image layer, read from the job's input (see api.tile_server). The ETag
    is known before any pixel is read, so a revalidation costs one row lookup."""
    job = _succeeded_job(job_id)
    box = tile_box(job.image_width, job.image_height, level, col, row)
    if box is None or ext != IMAGE_FORMAT:
        raise ApiError(404, "not_found", "no such tile")
    etag = f"{job.id}-{level}-{col}-{row}-r{RENDER_VERSION}"
    if etag in request.if_none_match:
        response = Response(status=304)
    else:
        ctx = _ctx()
        ref = input_ref(ctx.settings, ctx.storage, job.image_key, (job.params or {}).get("image_url"))
        data = ctx.tiles.tile(job.id, ref, box, (job.id, level, col, row))
        response = Response(data, mimetype="image/jpeg")
    response.set_etag(etag)
    response.headers["Cache-Control"] = IMMUTABLE
    return response
