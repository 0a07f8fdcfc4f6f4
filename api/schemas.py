"""Marshmallow schemas of the HTTP representation; flask-smorest builds the OpenAPI
document from them."""

from __future__ import annotations

import marshmallow as ma

from shared.job_status import JobStatus
from shared.jobspec import FORM_FIELDS, FormField
from shared.webhook_store import WebhookState

STATUSES = [status.value for status in JobStatus]


class ImageSchema(ma.Schema):
    width = ma.fields.Integer(required=True)
    height = ma.fields.Integer(required=True)
    sha256 = ma.fields.String(required=True)
    format = ma.fields.String(required=True)
    bytes = ma.fields.Integer(required=True)


class JobErrorSchema(ma.Schema):
    code = ma.fields.String(required=True)
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


class ResultSchema(ma.Schema):
    classes = ma.fields.List(ma.fields.Nested(ClassResultSchema), required=True)
    grid = ma.fields.Dict(required=True)
    overlay_size = ma.fields.Dict(required=True)
    timings = ma.fields.Dict(required=True)
    heatmap_url = ma.fields.String(required=True)
    summary_url = ma.fields.String(required=True)


class WebhookSchema(ma.Schema):
    url = ma.fields.String(required=True)
    state = ma.fields.String(
        allow_none=True,
        validate=ma.validate.OneOf([state.value for state in WebhookState]),
        metadata={"description": "null until the first attempt"},
    )
    attempts = ma.fields.Integer(required=True)
    last_status = ma.fields.Integer(allow_none=True, metadata={"description": "HTTP status of the last attempt"})
    last_error = ma.fields.String(allow_none=True)
    last_attempt_at = ma.fields.DateTime(allow_none=True)
    next_attempt_at = ma.fields.DateTime(allow_none=True)


class JobSchema(ma.Schema):
    id = ma.fields.String(required=True)
    status = ma.fields.String(required=True, validate=ma.validate.OneOf(STATUSES))
    progress = ma.fields.Float(required=True)
    created_at = ma.fields.DateTime(required=True)
    started_at = ma.fields.DateTime(allow_none=True)
    finished_at = ma.fields.DateTime(allow_none=True)
    model = ma.fields.String(required=True)
    mode = ma.fields.String(required=True)
    params = ma.fields.Dict(required=True)
    image = ma.fields.Nested(ImageSchema, required=True)
    attempts = ma.fields.Integer(required=True)
    worker = ma.fields.String(allow_none=True)
    error = ma.fields.Nested(JobErrorSchema, allow_none=True)
    result = ma.fields.Nested(ResultSchema, allow_none=True)
    url = ma.fields.String(required=True)
    webhook = ma.fields.Nested(WebhookSchema, allow_none=True, metadata={"description": "deliveries to callback_url"})


class JobListSchema(ma.Schema):
    jobs = ma.fields.List(ma.fields.Nested(JobSchema), required=True)
    next_cursor = ma.fields.String(allow_none=True)


class JobListQuerySchema(ma.Schema):
    class Meta:
        unknown = ma.RAISE

    status = ma.fields.String(validate=ma.validate.OneOf(STATUSES))
    limit = ma.fields.Integer(load_default=50, validate=ma.validate.Range(min=1, max=200))
    cursor = ma.fields.String(validate=ma.validate.Length(min=1, max=200))


class SizeSchema(ma.Schema):
    height = ma.fields.Integer(required=True)
    width = ma.fields.Integer(required=True)


class ModelSchema(ma.Schema):
    name = ma.fields.String(required=True)
    classes = ma.fields.List(ma.fields.String(), required=True)
    num_classes = ma.fields.Integer(required=True)
    input_size = ma.fields.Nested(SizeSchema, required=True)
    output_stride = ma.fields.Integer(allow_none=True)
    preprocess = ma.fields.String(required=True)
    description = ma.fields.String()


class ModelProblemSchema(ma.Schema):
    file = ma.fields.String(required=True, metadata={"description": "the sidecar's file name"})
    message = ma.fields.String(required=True, metadata={"description": "why the model is not offered"})


class ModelListSchema(ma.Schema):
    models = ma.fields.List(ma.fields.Nested(ModelSchema), required=True)
    problems = ma.fields.List(
        ma.fields.Nested(ModelProblemSchema),
        required=True,
        metadata={"description": "sidecars in the model folders that were ignored, and why"},
    )


def _form_property(field: FormField) -> dict:
    prop = {"type": field.type, "description": field.description}
    if field.choices:
        prop["enum"] = list(field.choices)
    if field.default is not None:
        prop["default"] = field.default
    if field.minimum is not None:
        prop["minimum"] = field.minimum
    return prop


#: The multipart submission body, generated from the one list of form fields (shared.jobspec).
SUBMIT_REQUEST_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["image"],
                "properties": {
                    "image": {
                        "type": "string",
                        "format": "binary",
                        "description": "JPEG, PNG, TIFF, BMP or WebP; checked by content",
                    },
                    **{field.name: _form_property(field) for field in FORM_FIELDS},
                },
            },
            "encoding": {"image": {"contentType": "application/octet-stream"}},
        }
    },
}
