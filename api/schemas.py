"""Marshmallow schemas of the HTTP representation; flask-smorest builds the OpenAPI
document from them, and the submission form is parsed and validated by the same schema
(`SubmitSchema`, generated from shared.jobspec.FORM_FIELDS) so that document and checks
cannot drift.

Everything a client reads is typed (no free-form objects), so that generated clients
(openapi-python-client, openapi-generator) get classes: `result.classes[0].peak.x`.
"""

from __future__ import annotations

import dataclasses
import types
import typing

import marshmallow as ma
from flask import current_app
from flask_smorest.fields import Upload

from shared.jobs.job_status import JobPhase, JobStatus
from shared.jobs.webhook_store import WebhookState
from shared.jobspec import DIRECT_SCHEMES, FORM_FIELDS, FormField, JobParams

STATUSES = [status.value for status in JobStatus]
PHASES = [phase.value for phase in JobPhase]


class ImageSchema(ma.Schema):
    width = ma.fields.Integer(required=True)
    height = ma.fields.Integer(required=True)
    sha256 = ma.fields.String(required=True)
    format = ma.fields.String(required=True)
    bytes = ma.fields.Integer(required=True)


class JobErrorSchema(ma.Schema):
    code = ma.fields.String(required=True, metadata={"description": "stable machine-readable code"})
    message = ma.fields.String(required=True)


class PeakSchema(ma.Schema):
    x = ma.fields.Integer(required=True)
    y = ma.fields.Integer(required=True)


class ClassResultSchema(ma.Schema):
    name = ma.fields.String(required=True)
    index = ma.fields.Integer(required=True)
    max = ma.fields.Float(required=True)
    mean = ma.fields.Float(required=True)
    peak = ma.fields.Nested(
        PeakSchema, required=True, metadata={"description": "centre of the best window, image pixels"}
    )
    overlay_url = ma.fields.String(required=True)


class SizeSchema(ma.Schema):
    height = ma.fields.Integer(required=True)
    width = ma.fields.Integer(required=True)


class StrideSchema(ma.Schema):
    y = ma.fields.Integer(required=True)
    x = ma.fields.Integer(required=True)


class GridSchema(ma.Schema):
    rows = ma.fields.Integer(required=True, metadata={"description": "score cells down"})
    cols = ma.fields.Integer(required=True, metadata={"description": "score cells across"})
    window = ma.fields.Nested(SizeSchema, required=True, metadata={"description": "pixels one cell looks at"})
    stride = ma.fields.Nested(StrideSchema, required=True, metadata={"description": "pixels between cells"})
    direct_scheme = ma.fields.String(
        validate=ma.validate.OneOf(DIRECT_SCHEMES[1:]),
        metadata={
            "description": "direct mode only: how the trunk ran ('rows': streamed row bands, no halo "
            "recomputation; 'tiles': tiles with halos, e.g. under a mask)"
        },
    )


class TimingsSchema(ma.Schema):
    model_load_s = ma.fields.Float(required=True)
    decode_s = ma.fields.Float(required=True)
    inference_s = ma.fields.Float(required=True)
    write_s = ma.fields.Float(required=True, metadata={"description": "all writers together"})
    total_s = ma.fields.Float(required=True)
    # Each writer's share of write_s (absent for jobs from before they were timed; overview
    # only when the input is read by region).
    write_overview_s = ma.fields.Float(metadata={"description": "the overlays' background, read from a low level"})
    write_viewer_s = ma.fields.Float(metadata={"description": "viewer.json and the heat pyramids"})
    write_heatmap_s = ma.fields.Float(metadata={"description": "the score grid file"})
    write_overlays_s = ma.fields.Float(metadata={"description": "overlay PNGs"})
    write_raster_s = ma.fields.Float(metadata={"description": "heatmap.tif"})
    write_regions_s = ma.fields.Float(metadata={"description": "regions.geojson"})
    shard_compute_s = ma.fields.Float(
        metadata={
            "description": "sharded jobs: the shards' inference seconds added up (inference_s is their wall time)"
        }
    )


def _schema_field(hint) -> ma.fields.Field:
    """A marshmallow field for a dataclass type hint (int, str, float, bool, optional, tuple/list)."""
    args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    optional = len(args) < len(typing.get_args(hint))
    if optional and len(args) == 1:
        hint = args[0]
    origin = typing.get_origin(hint)
    if origin in (tuple, list):
        inner = _schema_field(typing.get_args(hint)[0])
        return ma.fields.List(inner, required=True, allow_none=optional)
    simple = {int: ma.fields.Integer, str: ma.fields.String, float: ma.fields.Float, bool: ma.fields.Boolean}
    kind = simple.get(hint) if not isinstance(hint, types.UnionType) else None
    return (kind or ma.fields.Raw)(required=True, allow_none=optional)


def _params_schema() -> type[ma.Schema]:
    """`params` as the engine runs them, generated from JobParams so a new parameter appears."""
    hints = typing.get_type_hints(JobParams)
    fields = {field.name: _schema_field(hints[field.name]) for field in dataclasses.fields(JobParams)}
    return ma.Schema.from_dict(fields, name="ParamsSchema")


ParamsSchema = _params_schema()


class ResultSchema(ma.Schema):
    classes = ma.fields.List(ma.fields.Nested(ClassResultSchema), required=True)
    grid = ma.fields.Nested(GridSchema, required=True)
    overlay_size = ma.fields.Nested(SizeSchema, required=True, metadata={"description": "overlay PNG size"})
    timings = ma.fields.Nested(TimingsSchema, required=True)
    heatmap_url = ma.fields.String(required=True)
    summary_url = ma.fields.String(required=True)
    raster_url = ma.fields.String(metadata={"description": "heatmap.tif (image/tiff)"})
    regions_url = ma.fields.String(metadata={"description": "regions.geojson (application/geo+json)"})
    regions_map_url = ma.fields.String(
        metadata={"description": "regions_map.geojson, georeferenced input only (application/geo+json)"}
    )


class WebhookSchema(ma.Schema):
    url = ma.fields.String(required=True)
    state = ma.fields.String(
        required=True,
        allow_none=True,
        validate=ma.validate.OneOf([state.value for state in WebhookState]),
        metadata={"description": "null until the first attempt"},
    )
    attempts = ma.fields.Integer(required=True)
    last_status = ma.fields.Integer(
        required=True, allow_none=True, metadata={"description": "HTTP status of the last attempt"}
    )
    last_error = ma.fields.String(required=True, allow_none=True)
    last_attempt_at = ma.fields.AwareDateTime(required=True, allow_none=True)
    next_attempt_at = ma.fields.AwareDateTime(required=True, allow_none=True)


class ShardsSchema(ma.Schema):
    count = ma.fields.Integer(required=True, metadata={"description": "bands the job's grid is computed in"})
    done = ma.fields.Integer(required=True)
    workers = ma.fields.List(ma.fields.String(), required=True, metadata={"description": "workers that ran them"})
    recomputed = ma.fields.Integer(
        required=True, metadata={"description": "shard runs beyond one per shard (a worker died, a straggler's backup)"}
    )


class JobSchema(ma.Schema):
    id = ma.fields.String(required=True)
    status = ma.fields.String(required=True, validate=ma.validate.OneOf(STATUSES))
    phase = ma.fields.String(
        required=True,
        validate=ma.validate.OneOf(PHASES),
        metadata={"description": "what the job does now: queued, reading, inference, writing, storing, done"},
    )
    progress = ma.fields.Float(required=True)
    created_at = ma.fields.AwareDateTime(required=True, metadata={"description": "UTC, with offset"})
    started_at = ma.fields.AwareDateTime(required=True, allow_none=True)
    finished_at = ma.fields.AwareDateTime(required=True, allow_none=True)
    model = ma.fields.String(required=True)
    mode = ma.fields.String(required=True)
    params = ma.fields.Nested(ParamsSchema, required=True)
    image = ma.fields.Nested(ImageSchema, required=True)
    attempts = ma.fields.Integer(required=True)
    worker = ma.fields.String(required=True, allow_none=True)
    error = ma.fields.Nested(JobErrorSchema, required=True, allow_none=True)
    result = ma.fields.Nested(
        ResultSchema, required=True, allow_none=True, metadata={"description": "set once the job succeeded"}
    )
    retry_of = ma.fields.String(
        required=True, allow_none=True, metadata={"description": "the failed or canceled job this job retries"}
    )
    shards = ma.fields.Nested(
        ShardsSchema,
        required=True,
        allow_none=True,
        metadata={"description": "a job split across workers (the `shards` parameter); null when one worker runs it"},
    )
    url = ma.fields.String(required=True)
    webhook = ma.fields.Nested(
        WebhookSchema, required=True, allow_none=True, metadata={"description": "deliveries to callback_url"}
    )


class JobListSchema(ma.Schema):
    jobs = ma.fields.List(ma.fields.Nested(JobSchema), required=True)
    next_cursor = ma.fields.String(required=True, allow_none=True)


class JobListQuerySchema(ma.Schema):
    class Meta:
        unknown = ma.RAISE

    status = ma.fields.String(validate=ma.validate.OneOf(STATUSES))
    limit = ma.fields.Integer(load_default=50, validate=ma.validate.Range(min=1, max=200))
    cursor = ma.fields.String(validate=ma.validate.Length(min=1, max=200))


class SummaryClassSchema(ma.Schema):
    name = ma.fields.String(required=True)
    index = ma.fields.Integer(required=True)
    max = ma.fields.Float(required=True)
    mean = ma.fields.Float(required=True)
    peak = ma.fields.Nested(PeakSchema, required=True)
    overlay = ma.fields.String(required=True, metadata={"description": "overlay file name"})
    scale = ma.fields.Nested(
        "ColourScaleSchema", metadata={"description": "the overlay's colour range for this class, in score units"}
    )
    peaks = ma.fields.List(
        ma.fields.Nested("ScoredPeakSchema"),
        metadata={"description": "local maxima at least one window apart, in the top half of the range, best first"},
    )


class ColourScaleSchema(ma.Schema):
    low = ma.fields.Float(required=True, metadata={"description": "score drawn darkest"})
    high = ma.fields.Float(required=True, metadata={"description": "score drawn brightest"})


class ScoredPeakSchema(ma.Schema):
    x = ma.fields.Integer(required=True)
    y = ma.fields.Integer(required=True)
    score = ma.fields.Float(required=True)


class OverlayLegendSchema(ma.Schema):
    colormap = ma.fields.String(required=True)
    weighting = ma.fields.String(required=True)
    legend_height = ma.fields.Integer(
        required=True, metadata={"description": "pixels of the legend strip under the map (0: none)"}
    )
    note = ma.fields.String()


class SummarySchema(ma.Schema):
    """summary.json as the worker writes it (documentation of the download)."""

    image = ma.fields.Nested(SizeSchema, required=True)
    model = ma.fields.String(required=True)
    mode = ma.fields.String(required=True)
    parameters = ma.fields.Nested(ParamsSchema, required=True)
    grid = ma.fields.Nested(GridSchema, required=True)
    overlay_size = ma.fields.Nested(SizeSchema, required=True)
    classes = ma.fields.List(ma.fields.Nested(SummaryClassSchema), required=True)
    timings = ma.fields.Nested(TimingsSchema, required=True)
    overlay = ma.fields.Nested(OverlayLegendSchema, metadata={"description": "how the overlay PNGs are drawn"})
    shards = ma.fields.Nested(ShardsSchema, metadata={"description": "sharded jobs: how the grid was computed"})


class ModelSchema(ma.Schema):
    name = ma.fields.String(required=True)
    classes = ma.fields.List(ma.fields.String(), required=True)
    num_classes = ma.fields.Integer(required=True)
    background_classes = ma.fields.List(
        ma.fields.String(),
        metadata={"description": "classes meaning 'nothing here': skipped by the default top_k and the first view"},
    )
    input_size = ma.fields.Nested(SizeSchema, required=True)
    output_stride = ma.fields.Integer(allow_none=True)
    preprocess = ma.fields.String(required=True)
    description = ma.fields.String()
    available = ma.fields.Boolean(
        required=True, metadata={"description": "whether it can run here; jobs for it are refused when false"}
    )
    reason = ma.fields.String(metadata={"description": "why it cannot run here (only when not available)"})


class ModelProblemSchema(ma.Schema):
    file = ma.fields.String(required=True, metadata={"description": "the sidecar's or the model file's name"})
    message = ma.fields.String(
        required=True, metadata={"description": "why the model is not offered (a job naming it is refused)"}
    )


class ModelListSchema(ma.Schema):
    models = ma.fields.List(ma.fields.Nested(ModelSchema), required=True)
    problems = ma.fields.List(
        ma.fields.Nested(ModelProblemSchema),
        required=True,
        metadata={
            "description": "model files and sidecars in the model folders that were ignored, and why: "
            "a model file without a sidecar, or a sidecar that disagrees with its model"
        },
    )


# --- the submission form ------------------------------------------------------------------
class SettingMaximum(ma.validate.Validator):
    """An upper bound that is a setting (MAX_BATCH_SIZE, ...): checked against the running
    app's settings, and written into the document as `maximum` by `document_limits`."""

    def __init__(self, setting: str):
        self.setting = setting

    def __call__(self, value):
        limit = getattr(current_app.config["HEATMAP_SETTINGS"], self.setting)
        if value > limit:
            raise ma.ValidationError(f"must be at most {limit}, got {value}")
        return value


#: Fields whose default is stated in words only: generated clients send every documented
#: default, and a top_k sent along with classes is refused ("give either top_k or classes").
DEFAULT_IN_WORDS = frozenset({"top_k"})


def _form_field(field: FormField) -> ma.fields.Field:
    metadata = {"description": field.description}
    if field.default is not None and field.name in DEFAULT_IN_WORDS:
        metadata["description"] = f"{field.description} (default {field.default}; leave out when giving classes)"
    elif field.default is not None:
        metadata["default"] = field.default  # documented only: an absent field stays absent
    validators: list = []
    if field.choices:
        validators.append(ma.validate.OneOf(field.choices))
    if field.max_length is not None:
        validators.append(ma.validate.Length(max=field.max_length))
    if field.minimum is not None:
        validators.append(ma.validate.Range(min=field.minimum))
    if field.maximum_setting is not None:
        validators.append(SettingMaximum(field.maximum_setting))
    kind = {"integer": ma.fields.Integer, "number": ma.fields.Float}.get(field.type, ma.fields.String)
    return kind(validate=validators, metadata=metadata)


#: Names of the file parts of a submission: the image (or an image_url form field instead)
#: and an optional mask picture.
IMAGE_FIELD = "image"
MASK_FIELD = "mask_image"
FILE_FIELDS = (IMAGE_FIELD, MASK_FIELD)


class _SubmitBase(ma.Schema):
    class Meta:
        unknown = ma.RAISE

    image = Upload(
        metadata={
            "description": "the image (required unless image_url is given): JPEG, PNG, WebP, BMP, TIFF incl. "
            "tiled/pyramidal/BigTIFF/OME/GeoTIFF, or a whole-slide file; checked by content",
            "limits": "upload",
        },
    )
    mask_image = Upload(
        metadata={
            "description": "optional mask picture (any size, stretched over the image): windows outside "
            "it are not computed; implies mask=image"
        },
    )

    @ma.pre_load
    def _empty_is_absent(self, data, **kwargs):
        """An empty text field (what an HTML form sends for an untouched input) means absent."""
        return {key: value for key, value in data.items() if value != ""}


#: The multipart body of ``POST /api/v1/jobs``: the image and every field of FORM_FIELDS.
SubmitSchema = _SubmitBase.from_dict({field.name: _form_field(field) for field in FORM_FIELDS}, name="SubmitSchema")
SUBMIT_FIELD_NAMES = frozenset(SubmitSchema().fields)


def document_limits(api, settings) -> None:
    """Write this deployment's limits into its OpenAPI document: `maximum` of fields bounded
    by a setting, and the upload limits on the image part. Call before registering blueprints."""

    def settings_limits(self, field, ret, **kwargs) -> dict:
        extra = {}
        for validator in getattr(field, "validators", ()):
            if isinstance(validator, SettingMaximum):
                extra["maximum"] = getattr(settings, validator.setting)
        if field.metadata.get("limits") == "upload":
            extra["description"] = (
                f"{field.metadata['description']}; at most {settings.max_upload_mb:g} MB and "
                f"{settings.max_image_pixels:,} pixels (413 above); text fields together at most "
                f"{settings.max_form_memory_kb} KB, at most {settings.max_form_parts} parts"
            )
        return extra

    api.ma_plugin.converter.add_attribute_function(settings_limits)


# --- downloads ----------------------------------------------------------------------------
#: Media type of each artifact, by file extension: the routes serve with it and document it.
MEDIA_TYPES = {
    "npz": "application/octet-stream",
    "json": "application/json",
    "png": "image/png",
    "tif": "image/tiff",
    "tiff": "image/tiff",
    "geojson": "application/geo+json",
}


def media_type(key: str) -> str:
    return MEDIA_TYPES.get(key.rsplit(".", 1)[-1].lower(), "application/octet-stream")


def download_doc(operation_id: str, extension: str, description: str, schema=None) -> dict:
    """`@blp.doc(**download_doc(...))` for an artifact route: operationId, the media type
    and, for JSON, the body's schema (binary otherwise; generated clients return bytes)."""
    body = schema if schema is not None else {"type": "string", "format": "binary"}
    return {
        "operationId": operation_id,
        "responses": {"200": {"description": description, "content": {MEDIA_TYPES[extension]: {"schema": body}}}},
    }


#: Header on responses about a job that has not finished: seconds until the next poll.
RETRY_AFTER_HEADER = {
    "Retry-After": {
        "description": "present while the job is queued or running: seconds to wait before polling again",
        "schema": {"type": "integer"},
    }
}
